"""`python -m training.gptq`: quantize a model to GPTQ 4-bit, for the GPTQ recipe (the original article's).

    python -m training.gptq --base-model embedded:SmolLM2-135M-Instruct --out outputs/smollm2-gptq

Needs the optional GPTQ extra in its own environment (requirements-gptq.txt: gptqmodel pulls a CUDA
build of torch). Runs on a CPU too: the 135M default takes about two minutes on 2 cores. The
calibration text is the training data's comments and replies, so no dataset is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from inference.default_model import ROOT
from inference.loading import resolve_base_model
from training.data import load_pairs


def calibration_texts(data: Path, limit: int) -> list[str]:
    return [f"{p.comment}\n{p.response}" for p in load_pairs(data)[:limit]]


def quantize(base_model: str, out: Path, bits: int, group_size: int, texts: list[str]) -> Path:
    from gptqmodel import GPTQModel, QuantizeConfig

    from inference.internals.gptqmodel import two_loader_workers

    two_loader_workers()
    model = GPTQModel.load(resolve_base_model(base_model), QuantizeConfig(bits=bits, group_size=group_size))
    model.quantize(texts, batch_size=4)
    model.save(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.gptq", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--base-model", required=True, help="local folder or Hub id ('embedded:SmolLM2-135M-Instruct' for the default)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the quantized model")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="weights per scale; must divide every layer's input width (SmolLM2: 576, so 64, not 128)",
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "train.jsonl", help="calibration pairs (a training data file)"
    )
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gptqmodel") is None:
        print(
            "error: gptqmodel is not installed; install requirements-gptq.txt in its own environment (see README)",
            file=sys.stderr,
        )
        return 2
    print(
        "quantized model saved to "
        f"{quantize(args.base_model, args.out, args.bits, args.group_size, calibration_texts(args.data, args.samples))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
