"""The quantization step before serving: llm-compressor quantizes a checkpoint into the
compressed-tensors format that vLLM loads by itself.

A standalone script, run with the vLLM environment's Python (never imported by the search,
and it imports nothing from evo_compress)::

    PYTHON quantize_job.py --input DIR --output DIR --scheme W4A16 --algorithm gptq \\
        --group-size 128 --calibration FILE --samples 64 --max-seq-len 512 [--device cuda]

``--calibration-ids FILE`` (a JSON list of token-id lists) gives the calibration as token ids
instead of text, used as they are (no tokenizer, no truncation): the transformers back end
passes its own calibration ids this way, so both back ends can be given the same tokens.

Exit code 0 on success (``--output`` holds the model, its tokenizer and
``evo_quantize.json``); on failure one clear line on stderr and exit code 1.

Written against llm-compressor 0.14 (``oneshot``; ``QuantizationModifier`` /
``GPTQModifier`` with ``config_groups``, ``scheme`` and ``ignore``; ``AWQModifier`` and
``SmoothQuantModifier`` as transforms in ``llmcompressor.modifiers.transform`` that need a
quantizing modifier after them). Older releases, where AWQ quantized by itself, are handled
by ``build_recipe``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

# scheme -> the algorithms that can produce it
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "W4A16": ("rtn", "gptq", "awq"),  # int4 weights in groups, 16-bit activations
    "W8A16": ("rtn", "gptq"),  # int8 weights per output channel, 16-bit activations
    "W8A8": ("rtn", "gptq", "smoothquant-gptq"),  # int8 weights and dynamic int8 activations
}
NEEDS_CALIBRATION = ("gptq", "awq", "smoothquant-gptq")
DEFAULT_GROUP_SIZE = 128  # llm-compressor's W4A16 preset
IGNORE = ["lm_head"]  # the output head stays in 16 bits, as in llm-compressor's examples
SMOOTHING_STRENGTH = 0.8  # llm-compressor's W8A8 int8 example
MARKER = "evo_quantize.json"

# Where each modifier lives, newest first (0.14 moved AWQ and SmoothQuant to transforms).
_MODIFIER_MODULES: dict[str, tuple[str, ...]] = {
    "QuantizationModifier": ("llmcompressor.modifiers.quantization",),
    "GPTQModifier": ("llmcompressor.modifiers.gptq", "llmcompressor.modifiers.quantization"),
    "AWQModifier": ("llmcompressor.modifiers.transform", "llmcompressor.modifiers.awq"),
    "SmoothQuantModifier": (
        "llmcompressor.modifiers.transform",
        "llmcompressor.modifiers.smoothquant",
    ),
}


class JobError(Exception):
    """A failure with a one-line explanation for the caller's log."""


# --------------------------------------------------------------------------- the recipe


def check_scheme(scheme: str, algorithm: str, group_size: int | None) -> int | None:
    """Validate the combination; returns the group size to use (None: per channel)."""
    if scheme not in ALGORITHMS:
        raise JobError(f"unknown --scheme {scheme!r}; expected one of {', '.join(ALGORITHMS)}")
    if algorithm not in ALGORITHMS[scheme]:
        raise JobError(
            f"--algorithm {algorithm!r} cannot produce {scheme}; expected one of "
            f"{', '.join(ALGORITHMS[scheme])}"
        )
    if scheme == "W4A16":
        size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise JobError(f"--group-size must be a positive integer, got {group_size!r}")
        return size
    if group_size is not None:
        raise JobError(
            f"--group-size is for W4A16 only: {scheme} quantizes weights per output channel, "
            f"got --group-size {group_size}"
        )
    return None


def _quantization_kwargs(
    scheme: str, group_size: int | None, symmetric: bool = True
) -> dict[str, Any]:
    """The QuantizationMixin arguments (shared by QuantizationModifier and GPTQModifier)."""
    if scheme == "W8A8":
        # llm-compressor's preset: int8 per-channel weights, dynamic per-token activations.
        return {"targets": ["Linear"], "scheme": "W8A8", "ignore": list(IGNORE)}
    if scheme == "W4A16":
        # The W4A16 preset (W4A16_ASYM for AWQ, as llm-compressor's AWQ examples use) with
        # the chosen group size (presets are fixed at 128).
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": symmetric,
            "strategy": "group",
            "group_size": group_size,
            "dynamic": False,
        }
    else:  # W8A16, per output channel like torchao's int8 weight-only
        weights = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
        }
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": list(IGNORE),
    }


def describe_recipe(scheme: str, algorithm: str, group_size: int | None) -> list[dict[str, Any]]:
    """The llm-compressor recipe as plain data: ``[{"class": name, "kwargs": {...}}]``, in
    the order oneshot applies them. Raises ``JobError`` for an invalid combination."""
    size = check_scheme(scheme, algorithm, group_size)
    quant = _quantization_kwargs(scheme, size)
    if algorithm == "rtn":
        return [{"class": "QuantizationModifier", "kwargs": quant}]
    if algorithm == "gptq":
        return [{"class": "GPTQModifier", "kwargs": quant}]
    if algorithm == "awq":
        # AWQ only rescales channels (mappings inferred from the architecture); the
        # QuantizationModifier after it quantizes, with zero points.
        return [
            {"class": "AWQModifier", "kwargs": {}},
            {"class": "QuantizationModifier", "kwargs": _quantization_kwargs(scheme, size, False)},
        ]
    assert algorithm == "smoothquant-gptq", algorithm
    return [
        {"class": "SmoothQuantModifier", "kwargs": {"smoothing_strength": SMOOTHING_STRENGTH}},
        {"class": "GPTQModifier", "kwargs": quant},
    ]


def _modifier_class(name: str) -> tuple[Any, str]:
    for module_name in _MODIFIER_MODULES[name]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is not None:
            return cls, module_name
    raise JobError(
        f"this llm-compressor has no {name} (looked in {', '.join(_MODIFIER_MODULES[name])})"
    )


def build_recipe(scheme: str, algorithm: str, group_size: int | None) -> list[Any]:
    """The modifier objects of ``describe_recipe``. Raises ``JobError`` when llm-compressor
    is not installed."""
    described = describe_recipe(scheme, algorithm, group_size)
    _require_llmcompressor()
    modifiers: list[Any] = []
    pending_awq: dict[str, Any] | None = None  # an old, self-quantizing AWQModifier
    for item in described:
        cls, module_name = _modifier_class(item["class"])
        kwargs = copy.deepcopy(item["kwargs"])
        if item["class"] == "AWQModifier" and module_name.endswith(".awq"):
            # Before the transform API, AWQModifier took the quantization arguments itself.
            pending_awq = {"cls": cls, "kwargs": kwargs}
            continue
        if pending_awq is not None and item["class"] == "QuantizationModifier":
            modifiers.append(pending_awq["cls"](**{**pending_awq["kwargs"], **kwargs}))
            pending_awq = None
            continue
        modifiers.append(cls(**kwargs))
    assert pending_awq is None
    return modifiers


def _require_llmcompressor() -> None:
    try:
        importlib.import_module("llmcompressor")
    except ImportError as exc:
        raise JobError(
            f"llm-compressor is not installed in this environment ({sys.executable}): "
            f"{exc}; install it next to vLLM (pip install llmcompressor)"
        ) from None


def llmcompressor_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llmcompressor")
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- the job


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise JobError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="quantize_job.py",
        description="Quantize a checkpoint with llm-compressor into compressed-tensors.",
    )
    p.add_argument("--input", required=True, type=Path, help="model folder to quantize")
    p.add_argument("--output", required=True, type=Path, help="folder to write (new or empty)")
    p.add_argument("--scheme", required=True, help=", ".join(ALGORITHMS))
    p.add_argument("--algorithm", required=True, help="rtn, gptq, awq or smoothquant-gptq")
    p.add_argument("--group-size", type=int, default=None, help="W4A16 group size (128)")
    p.add_argument("--calibration", type=Path, default=None, help="text file, one sample a line")
    p.add_argument(
        "--calibration-ids",
        type=Path,
        default=None,
        help="JSON file: a list of token-id lists, used as they are instead of --calibration",
    )
    p.add_argument("--samples", type=int, default=64, help="calibration samples to use")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _check_args(args: argparse.Namespace) -> None:
    args.group_size = check_scheme(args.scheme, args.algorithm, args.group_size)
    if args.max_seq_len < 1:
        raise JobError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    if args.algorithm in NEEDS_CALIBRATION:
        if args.samples < 1:
            raise JobError(
                f"--algorithm {args.algorithm} needs --samples >= 1, got {args.samples}"
            )
        if args.calibration is not None and args.calibration_ids is not None:
            raise JobError("give --calibration or --calibration-ids, not both")
        given = args.calibration if args.calibration is not None else args.calibration_ids
        if given is None:
            raise JobError(f"--algorithm {args.algorithm} needs calibration text: --calibration")
        if not given.is_file():
            option = "--calibration" if args.calibration is not None else "--calibration-ids"
            raise JobError(f"{option} {given} is not a file")
    if not (args.input / "config.json").is_file():
        raise JobError(f"--input {args.input} is not a model folder (no config.json)")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise JobError(f"--output {args.output} exists and is not an empty folder")
    if args.device not in ("auto", "cpu", "cuda") and not (
        args.device.startswith("cuda:") and args.device[5:].isdigit()
    ):
        raise JobError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")


def _calibration_texts(path: Path, samples: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise JobError(f"cannot read --calibration {path}: {exc.strerror}") from None
    texts = [line.strip() for line in lines if line.strip()][:samples]
    if not texts:
        raise JobError(f"--calibration {path} has no non-empty lines")
    return texts


def _calibration_ids(path: Path, samples: int) -> list[list[int]]:
    """The first ``samples`` rows of a JSON list of token-id lists."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobError(f"cannot read --calibration-ids {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise JobError(f"--calibration-ids {path} is not JSON: {exc}") from None
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(row, list) and row for row in rows)
        or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for row in rows for t in row
        )
    ):
        raise JobError(
            f"--calibration-ids {path} must be a non-empty list of non-empty lists of token ids"
        )
    return [list(row) for row in rows[:samples]]


def _select_device(device: str) -> None:
    """Restrict the visible GPUs before torch is imported (llm-compressor onloads layers to
    the first visible device)."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]


def _dtype_kwargs(transformers_version: str) -> dict[str, str]:
    parts = [int(p) for p in transformers_version.split(".")[:2] if p.isdigit()]
    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    return {"dtype": "auto"} if tuple(parts) >= (4, 56) else {"torch_dtype": "auto"}


class _TokenIdsOnly:
    """Given as llm-compressor's processor when the calibration is token ids and the model
    folder has no tokenizer: nothing is tokenized, so nothing calls it."""


def _tokenizer(transformers: Any, folder: Path, *, required: bool) -> Any:
    """The model folder's tokenizer; with token ids for calibration, a folder without one
    (a model saved by the transformers back end) is quantized without it."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        if required:
            raise
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    texts: list[str] = []
    ids: list[list[int]] = []
    if args.algorithm in NEEDS_CALIBRATION:
        if args.calibration_ids is not None:
            ids = _calibration_ids(args.calibration_ids, args.samples)
        else:
            texts = _calibration_texts(args.calibration, args.samples)
    _select_device(args.device)
    modifiers = build_recipe(args.scheme, args.algorithm, args.group_size)

    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {args.device}, but torch sees no CUDA device")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.input), **_dtype_kwargs(transformers.__version__)
    )
    tokenizer = _tokenizer(transformers, args.input, required=args.calibration_ids is None)
    if texts:
        encoded = [tokenizer(text, truncation=True, max_length=args.max_seq_len) for text in texts]
        ids = [e["input_ids"] for e in encoded]
    oneshot_kwargs: dict[str, Any] = {"model": model, "recipe": modifiers}
    if ids:
        # Token ids, in order, one sample a batch: the same tensors whether they came from
        # text or from --calibration-ids. A DataLoader is used as it is (no tokenizing, no
        # shuffling); llm-compressor asks for a processor only to tokenize text.
        batches = [
            {
                "input_ids": torch.tensor([row]),
                "attention_mask": torch.ones(1, len(row), dtype=torch.long),
            }
            for row in ids
        ]
        # A list is a map-style dataset to torch; its stubs ask for a Dataset.
        loader: Any = torch.utils.data.DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
        oneshot_kwargs.update(
            dataset=loader,
            processor=tokenizer if tokenizer is not None else _TokenIdsOnly(),
            num_calibration_samples=len(ids),
        )
    from llmcompressor import oneshot

    _no_pinning_without_an_accelerator()
    oneshot(**oneshot_kwargs)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.output), save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(args.output))
    info = {
        "scheme": args.scheme,
        "algorithm": args.algorithm,
        "group_size": args.group_size,
        "samples": len(ids),
        "calibration": "token ids" if args.calibration_ids is not None else "text",
        "max_seq_len": args.max_seq_len if texts else None,
        "recipe": describe_recipe(args.scheme, args.algorithm, args.group_size),
        "seconds": round(time.perf_counter() - started, 3),
        "llmcompressor_version": llmcompressor_version(),
    }
    (args.output / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _no_pinning_without_an_accelerator() -> None:
    """llm-compressor's AWQ pins its cached activations in page-locked memory so that they
    reach an accelerator faster; with none, ``pin_memory`` raises ("Cannot access accelerator
    device when none is available") and AWQ fails on the CPU. Pinning changes no value, so
    without an accelerator it is left out and AWQ runs on the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:  # a release without the cache pins nothing
        return
    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _check_args(args)
        info = run(args)
    except JobError as exc:
        print(f"quantize_job: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a failure inside llm-compressor / transformers
        traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"quantize_job: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    print(
        f"quantize_job: wrote {info['scheme']} ({info['algorithm']}) to {args.output} "
        f"in {info['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
