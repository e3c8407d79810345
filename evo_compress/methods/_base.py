"""What the project knows about one compression method, and the registry that holds them.

Every consumer (the search space, the back ends, the synthetic landscape, the expert
mutation, the docs) reads these entries instead of keeping its own list of method names.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Literal

from evo_compress.exceptions import RegistryError
from evo_compress.registry import BUILTIN

logger = logging.getLogger(__name__)

Kind = Literal["quantization"]
KINDS: tuple[Kind, ...] = ("quantization",)
BACKENDS = ("transformers", "vllm", "synthetic")
VLLM_SCHEMES = ("W4A16", "W8A16", "W8A8")
CPU_ISAS = ("avx512", "avx2")  # the kernels vLLM's CPU build ships


def _check_reference(field_name: str, value: str | None) -> None:
    module, colon, attr = (value or "").partition(":")
    if value is not None and (not colon or not module or not attr):
        raise ValueError(f'`{field_name}` must be "module:attr", got {value!r}')


@dataclass(frozen=True)
class TransformersSupport:
    """How the transformers back end runs the method: its kernel, the probe that says whether
    it runs on a device, and the torchao config its saved checkpoint declares. Each is a
    ``"module:attr"`` reference (``attr`` may be dotted), imported only when it is used, so
    that the registry stays light (lm-eval's ``"hf": "lm_eval.models.huggingface:HFLM"``).

    - ``kernel``: called with a ``evo_compress.fitness.model.quantize.QuantizeJob``; returns
      ``(model, info)``, the quantized model and what was done (``library``, ``algorithm``,
      ``bits``, ``storage``, ...). None: the method leaves the weights as they are.
    - ``probe``: called with a small ``nn.Linear`` (128 -> 64) and an input ``x``; quantizes
      the layer (groups of 64) and returns ``(y, reference)``: its output and, when it can,
      the output of its dequantized weight. None: nothing to probe.
    - ``storage``: called with ``(group_size, device, dtype)``; returns the torchao config
      whose tensors the kernel leaves in the model, for saving. None: the method's model
      saves as it is (plain weights, or the quantization config its loader gave it).
    - ``requires``: called with ``(method, device)`` before every use (never cached); returns
      why what the kernel needs beyond this Python is missing (an environment, a device), or
      None. None: nothing beyond the probe.

    Raises:
        ValueError: ``library`` is empty, a reference is not ``"module:attr"``, a probe,
            storage or requirement is given without a kernel, or ``min_compute_capability``
            is not ``(major, minor)``.
    """

    library: str
    """The library that does the work, for the docs (``torchao``, ``bitsandbytes``, ...)."""
    kernel: str | None = None
    """``"module:attr"`` of the function that quantizes the model; None: weights unchanged."""
    probe: str | None = None
    """``"module:attr"`` of the probe that says whether the kernel runs on a device."""
    storage: str | None = None
    """``"module:attr"`` of the function that gives the torchao config to save with."""
    requires: str | None = None
    """``"module:attr"`` of the check of what the kernel needs beyond this Python."""
    min_compute_capability: tuple[int, int] | None = None
    """Needs a CUDA GPU of at least this compute capability; None: any device."""

    def __post_init__(self) -> None:
        if not self.library:
            raise ValueError("`library` must name the library that runs the method")
        for field_name in ("kernel", "probe", "storage", "requires"):
            _check_reference(field_name, getattr(self, field_name))
        if self.kernel is None and (
            self.probe is not None or self.storage is not None or self.requires is not None
        ):
            raise ValueError("a method without a `kernel` has nothing to probe, store or need")
        cc = self.min_compute_capability
        if cc is not None and (len(cc) != 2 or not all(isinstance(p, int) for p in cc)):
            raise ValueError(f"`min_compute_capability` must be (major, minor), got {cc!r}")


@dataclass(frozen=True)
class VllmSupport:
    """How the vLLM back end serves the method: quantized by vLLM while loading
    (``quantization``, its ``--quantization`` name), or by an llm-compressor step before
    serving (``scheme`` and ``algorithm``). Neither: nothing to do (the unquantized model).

    Raises:
        ValueError: Both ``quantization`` and ``scheme`` are given, only one of ``scheme``
            and ``algorithm`` is, ``scheme`` is not one of ``VLLM_SCHEMES``, or
            ``cpu_isas`` names an instruction set not in ``CPU_ISAS``.
    """

    quantization: str | None = None
    """vLLM's ``--quantization`` name, for a method vLLM quantizes while loading."""
    scheme: str | None = None
    """llm-compressor's scheme (``W4A16``, ``W8A16``, ``W8A8``), for an offline step."""
    algorithm: str | None = None
    """The algorithm of that step (``rtn``, ``gptq``, ``awq``, ``smoothquant-gptq``)."""
    group_sizes: tuple[int, ...] | None = None
    """The group sizes vLLM can serve, when fewer than the method's own."""
    why_not_online: str = ""
    """For an llm-compressor method: why vLLM's own in-flight quantization will not do."""
    cpu_isas: tuple[str, ...] = ()
    """The instruction sets (``avx512``, ``avx2``) on which vLLM's CPU build was measured to
    serve the method; empty: the CPU build does not serve it."""
    cpu_refused: str = ""
    """Why vLLM's CPU build does not serve the method (where ``cpu_isas`` leaves it out)."""

    def __post_init__(self) -> None:
        if not set(self.cpu_isas) <= set(CPU_ISAS):
            raise ValueError(f"`cpu_isas` must be among {CPU_ISAS}, got {self.cpu_isas!r}")
        if self.quantization is not None and self.scheme is not None:
            raise ValueError("a vLLM method is quantized online or by llm-compressor, not both")
        if (self.scheme is None) != (self.algorithm is None):
            raise ValueError("an llm-compressor step needs both `scheme` and `algorithm`")
        if self.scheme is not None and self.scheme not in VLLM_SCHEMES:
            raise ValueError(f"`scheme` must be one of {VLLM_SCHEMES}, got {self.scheme!r}")

    @property
    def offline(self) -> bool:
        """Quantized by an llm-compressor step before serving."""
        return self.scheme is not None


@dataclass(frozen=True)
class SyntheticTraits:
    """The method's terms in the synthetic landscape, for a 7B model at group size 128.

    A method without them is not run by the synthetic back end (``SyntheticEvaluator``).

    Raises:
        ValueError: ``degradation`` or ``calibration_j`` is negative, or ``dequant_factor``
            or ``compute_factor`` is not positive.
    """

    degradation: float
    """Accuracy degradation (see ``SyntheticEvaluator._accuracy``)."""
    dequant_factor: float
    """Weight-streaming slowdown of the decode kernel relative to ideal bandwidth."""
    compute_factor: float
    """Compute-side efficiency relative to bf16 (w8a8 / fp8 run on 2x tensor cores)."""
    calibration_j: float
    """One-time calibration / quantization energy in joules."""

    def __post_init__(self) -> None:
        if self.degradation < 0 or self.calibration_j < 0:
            raise ValueError("`degradation` and `calibration_j` must be >= 0")
        if self.dequant_factor <= 0 or self.compute_factor <= 0:
            raise ValueError("`dequant_factor` and `compute_factor` must be > 0")


@dataclass(frozen=True)
class CompressionMethod:
    """One compression method: what it is, what it needs and which back ends run it.

    A back end supports the method exactly when its field is set (``transformers``,
    ``vllm``, ``synthetic``). A plugin distribution exports one such entry under the
    ``evo_compress.methods`` entry-point group, its entry-point name equal to ``name``
    (``MethodRegistry``); ``evo_compress.testing.methods.check_method`` checks it.

    Raises:
        ValueError: A field is out of range: ``name`` not lower-case letters, digits and
            ``_``; an unknown ``kind``; a ``description`` that is empty or not one line; bits
            outside 1..32; group sizes that are not distinct positive integers; or vLLM group
            sizes that are not among the method's own.
    """

    name: str
    """The method's name in recipes and configs (lower-case letters, digits and ``_``)."""
    kind: Kind
    """What kind of compression it is (``"quantization"``)."""
    description: str
    """One line for the docs."""
    weight_bits: int
    """Bits per stored weight value (16: left in the model's dtype)."""
    activation_bits: int = 16
    """Bits of the matmul inputs at run time (8: int8 / fp8 activations)."""
    calibration: bool = False
    """Needs calibration text (activation statistics) to quantize."""
    group_sizes: tuple[int, ...] = ()
    """Weights per quantization group it accepts; empty: per channel, no group size."""
    scale_bits: int = 16
    """Bits of the scale stored per group (grouped methods only)."""
    transformers: TransformersSupport | None = None
    """How the transformers back end runs it; None: it does not."""
    vllm: VllmSupport | None = None
    """How the vLLM back end serves it; None: it does not."""
    synthetic: SyntheticTraits | None = None
    """Its terms in the synthetic landscape; None: the synthetic back end does not offer it."""

    def __post_init__(self) -> None:
        if (
            not self.name
            or not self.name.replace("_", "").isalnum()
            or self.name != self.name.lower()
        ):
            raise ValueError(f"`name` must be lower-case letters, digits and _, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}")
        if not self.description or "\n" in self.description:
            raise ValueError(f"`description` of `{self.name}` must be one line")
        for field_name in ("weight_bits", "activation_bits", "scale_bits"):
            bits = getattr(self, field_name)
            if not isinstance(bits, int) or not 1 <= bits <= 32:
                raise ValueError(f"`{field_name}` of `{self.name}` must be 1..32, got {bits!r}")
        if any(not isinstance(g, int) or g < 1 for g in self.group_sizes) or len(
            set(self.group_sizes)
        ) != len(self.group_sizes):
            raise ValueError(f"`group_sizes` of `{self.name}` must be distinct positive ints")
        vllm_sizes = self.vllm.group_sizes if self.vllm is not None else None
        if vllm_sizes is not None and not set(vllm_sizes) <= set(self.group_sizes):
            raise ValueError(f"vLLM group sizes of `{self.name}` must be among its own")

    @property
    def grouped(self) -> bool:
        """Quantizes in groups, so a recipe picks a group size."""
        return bool(self.group_sizes)

    @property
    def backends(self) -> tuple[str, ...]:
        """The back ends that run the method, by name."""
        return tuple(b for b in BACKENDS if getattr(self, b) is not None)


class MethodRegistry:
    """Compression methods by name, in registration order (the order of the search space's
    choices). Registering a name twice raises; an unknown name raises with "did you mean".

    With ``group``, the methods that installed distributions declare under that entry-point
    group join after the built-ins, on the first lookup or listing (so the built-ins' order,
    and every random draw over them, is unchanged)::

        [project.entry-points."evo_compress.methods"]
        my_int3 = "my_package.methods:MY_INT3"   # a CompressionMethod named `my_int3`

    A plugin that reuses a registered name is ignored with one warning line; one that fails
    to load is left out, and looking its name up raises one line naming its distribution.
    """

    def __init__(self, group: str | None = None) -> None:
        self.group = group
        self._entries: dict[str, CompressionMethod] = {}
        self._origins: dict[str, str] = {}
        self._broken: dict[str, str] = {}
        self._discovered = group is None

    def register(self, method: CompressionMethod, origin: str = BUILTIN) -> CompressionMethod:
        """Add a method after those registered.

        Args:
            method: The method.
            origin: Who registered it: ``"built-in"``, or a plugin's distribution (name and
                version).

        Returns:
            ``method`` itself.

        Raises:
            RegistryError: A method of that name is registered already.
        """
        if method.name in self._entries:
            raise RegistryError(f"compression method `{method.name}` is already registered")
        self._entries[method.name] = method
        self._origins[method.name] = origin
        return method

    def get(self, name: str, kind: Kind | None = None) -> CompressionMethod:
        """The method named ``name``.

        Args:
            name: Its name.
            kind: Only a method of this kind; None: any.

        Returns:
            The method.

        Raises:
            RegistryError: No method of that name (and kind) is registered: the message
                says "did you mean" and lists the known names; or the plugin method of that
                name failed to load, naming its distribution.
        """
        self._discover()
        method = self._entries.get(name)
        if method is None and name in self._broken:
            raise RegistryError(self._broken[name])
        if method is None or (kind is not None and method.kind != kind):
            known = self.names(kind)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            what = f"{kind} method" if kind else "compression method"
            raise RegistryError(f"unknown {what} `{name}`{hint}; known: {', '.join(known)}")
        return method

    def find(self, name: object, kind: Kind | None = None) -> CompressionMethod | None:
        """The method named ``name`` (of ``kind``), or None: for values read from recipes.

        Args:
            name: Any value; only a string can name a method.
            kind: Only a method of this kind; None: any.

        Returns:
            The method, or None when there is no such method (of ``kind``).
        """
        self._discover()
        method = self._entries.get(name) if isinstance(name, str) else None
        return method if method is not None and (kind is None or method.kind == kind) else None

    def origin(self, name: str) -> str:
        """Who registered a method.

        Args:
            name: The method's name.

        Returns:
            ``"built-in"``, or the plugin distribution (name and version) that registered it.

        Raises:
            RegistryError: No method of that name is registered (as ``get``).
        """
        self.get(name)
        return self._origins[name]

    def broken(self) -> dict[str, str]:
        """The plugin methods that failed to load.

        Returns:
            The one-line reason of each, by entry-point name (a copy).
        """
        self._discover()
        return dict(self._broken)

    def methods(
        self, kind: Kind | None = None, backend: str | None = None
    ) -> list[CompressionMethod]:
        """The registered methods, in registration order.

        Args:
            kind: Only those of this kind; None: any.
            backend: Only those this back end runs (one of ``BACKENDS``); None: any.

        Returns:
            The methods.

        Raises:
            RegistryError: ``backend`` is not one of ``BACKENDS``.
        """
        if backend is not None and backend not in BACKENDS:
            raise RegistryError(f"unknown back end `{backend}`; known: {', '.join(BACKENDS)}")
        self._discover()
        return [
            m
            for m in self._entries.values()
            if (kind is None or m.kind == kind) and (backend is None or backend in m.backends)
        ]

    def names(self, kind: Kind | None = None, backend: str | None = None) -> list[str]:
        """The names of the registered methods, in registration order.

        Args:
            kind: Only those of this kind; None: any.
            backend: Only those this back end runs (one of ``BACKENDS``); None: any.

        Returns:
            The names.

        Raises:
            RegistryError: ``backend`` is not one of ``BACKENDS``.
        """
        return [m.name for m in self.methods(kind, backend)]

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[CompressionMethod]:
        self._discover()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._discover()
        return len(self._entries)

    # ------------------------------------------------------------------ plugins
    def _discover(self) -> None:
        """Load the group's methods, once, after the built-ins (entry points sorted by name,
        so the order of the search space's choices does not depend on install order)."""
        if self._discovered:
            return
        self._discovered = True
        assert self.group is not None
        found = sorted(entry_points(group=self.group), key=lambda ep: ep.name)
        for entry_point in found:
            dist = getattr(entry_point, "dist", None)
            origin = (
                f"{dist.metadata['Name']} {dist.version}"
                if dist is not None
                else "unknown distribution"
            )
            where = (
                f"entry point `{entry_point.name} = {entry_point.value}` of distribution "
                f"`{origin}` (group `{entry_point.group}`)"
            )
            if entry_point.name in self._entries:
                taken = self._origins[entry_point.name]
                owner = "a built-in" if taken == BUILTIN else f"distribution `{taken}`"
                logger.warning(
                    "warning: plugin compression method `%s` ignored: the name is taken by %s; %s",
                    entry_point.name,
                    owner,
                    where,
                )
                continue
            try:
                method = entry_point.load()
            except Exception as exc:  # a broken plugin is one line, where its name is used
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())
                self._broken[entry_point.name] = (
                    f"plugin compression method `{entry_point.name}` failed to load "
                    f"({detail}); {where}"
                )
                continue
            if not isinstance(method, CompressionMethod) or method.name != entry_point.name:
                self._broken[entry_point.name] = (
                    f"plugin compression method `{entry_point.name}` is not a "
                    f"CompressionMethod named `{entry_point.name}`; {where}"
                )
                continue
            self.register(method, origin)
