"""TRL's DPOTrainer from the inside: training on token ids that replytune's renderer made.

DPOTrainer tokenizes its dataset itself (``_prepare_dataset``: the prompt, then prompt + reply, the
reply being what follows their common prefix, plus the tokenizer's EOS). replytune's renderer
already made the ids the app sends and a supervised example learns (the comment tokenized with the
whitespace before it, the end-of-turn token after the reply); a dataset that has ``prompt_ids``,
``chosen_ids`` and ``rejected_ids`` is taken as it is, so the preference run learns those tokens.

On another TRL version: TRL tokenizes the decoded text of the same ids (its stock path; the tokens
can differ where BPE merges across the prompt/reply boundary).
"""

from __future__ import annotations

from inference.internals import written_for

WRITTEN_FOR = "==1.16.*"
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
LENGTH = "length"  # kept where present: the length-grouped sampler's column


def takes_token_ids(trainer_class: type) -> type:
    """``trainer_class`` (a DPOTrainer) with a dataset of token ids used as it is."""
    if not written_for("trl", WRITTEN_FOR, "DPOTrainer._prepare_dataset"):
        return trainer_class

    class TokenIds(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if all(name in dataset.column_names for name in IDS):
                return dataset.select_columns([*IDS, *([LENGTH] if LENGTH in dataset.column_names else [])])
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    TokenIds.__name__ = TokenIds.__qualname__ = trainer_class.__name__
    TokenIds.__doc__ = trainer_class.__doc__
    return TokenIds
