"""What a simulated gRPC worker generates for one choice: token ids of its BPE, and how the output ends.

The ids are decided before the engine runs (the engine only paces them), following SGLang's finish rules:

* `max_new_tokens` unset: the output ends naturally, `--max-new-tokens-default` ids of which the last is EOS;
* `max_new_tokens` set: exactly that many ids (finish "length");
* the first id in `stop_token_ids` or the EOS ids, at or after `min_new_tokens`, ends the output there (finish
  "stop", that id included and reported as `matched_token_id`); `ignore_eos` turns both checks off, as in SGLang;
* a scripted `output_text` (see `FaultState`) replaces the drawn words with the text's encoding, then EOS.

Words are drawn like the HTTP simulator's (`shepherd.sim.tokenizer.word_draws`): the same prompt, seed and choice
always give the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from smg_grpc_proto import sglang_scheduler_pb2

from shepherd.sim.bpe import SimTokenizer
from shepherd.sim.tokenizer import word_draws


@dataclass(frozen=True, slots=True)
class OutputPlan:
    ids: list[int]
    matched: int | None  # the stop id the output ends with, None when it ends by length

    def finish(self, generated: int) -> tuple[str, int | None]:
        """(finish_reason, matched id) once `generated` ids were produced (a PD prefill stops after one)."""
        if self.matched is not None and generated == len(self.ids):
            return "stop", self.matched
        return "length", None


def plan_output(
    tokenizer: SimTokenizer,
    prompt_ids: list[int],
    params: sglang_scheduler_pb2.SamplingParams,
    default_length: int,
    seed: int,
    choice: int,
    script: str | None,
) -> OutputPlan:
    limit = params.max_new_tokens if params.HasField("max_new_tokens") else None
    natural_end = not params.ignore_eos
    if script is not None:
        ids = tokenizer.encode(script)
        if natural_end:
            ids.append(tokenizer.eos_id)
    else:
        length = default_length if limit is None else limit
        ids = [tokenizer.word_ids[b] for b in word_draws(prompt_ids, length, seed, choice)]
        if limit is None and ids and natural_end:
            ids[-1] = tokenizer.eos_id
    if limit is not None:
        ids = ids[:limit]
    if natural_end:
        stops = {*tokenizer.eos_ids, *params.stop_token_ids}
        for position in range(params.min_new_tokens, len(ids)):
            if ids[position] in stops:
                return OutputPlan(ids[: position + 1], ids[position])
    return OutputPlan(ids, None)
