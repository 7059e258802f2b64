"""Argument checks shared by the public ops.

Static checks (rank, dtype, device) run in the public functions and are traceable by torch.compile. Checks of
offset *values* need the data, so they run inside the registered ops, where a sync cannot break a graph (and
where a public function must read a length from the data anyway, e.g. an omitted ``max_seqlen``). A GPU tensor
that passed is remembered until it changes in place. The checks are skipped while a CUDA graph is being captured (a
sync is illegal there) or when ``MDUS_CHECK_OFFSETS=0``. The kernels clamp offsets into range, so unchecked bad
offsets give wrong numbers but never touch memory outside the tensors.
"""

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_number(value, name: str, expect: str, *, integer: bool = False, ok=lambda v: True) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a number (an integer with ``integer``; never a bool;
    a symbolic size under torch.compile counts) that is finite and satisfies ``ok``; ``expect`` says what is
    wanted ("a number in [0, 1]")."""
    kinds = (numbers.Integral, torch.SymInt) if integer else (numbers.Real, torch.SymInt, torch.SymFloat)
    if isinstance(value, bool) or not isinstance(value, kinds) or (
            isinstance(value, numbers.Real) and not math.isfinite(value)) or not ok(value):
        raise ValueError(f"{name} must be {expect}, got {value!r}")


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None,
                 shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D{' ' + shape_doc if shape_doc else ''}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the data), got {t.device}")


def check_offsets(offsets, name: str, *, device: torch.device) -> None:
    """Static checks of a 1-D offsets / cu_seqlens tensor. Bad offsets raise ValueError, whatever is wrong."""
    if not isinstance(offsets, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be 1-D with at least one element, got shape {tuple(offsets.shape)}")
    if offsets.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {str(offsets.dtype).removeprefix('torch.')}")
    if offsets.device != device:
        raise ValueError(f"{name} must be on {device} (like the data), got {offsets.device}")


def _value_checks_enabled(t: torch.Tensor) -> bool:
    if os.environ.get("MDUS_CHECK_OFFSETS", "1") == "0":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _remembers(offsets: torch.Tensor) -> bool:
    """Whether a check that passed is remembered on ``offsets``: on accelerators (where a check costs a sync), and
    only for tensors with a version counter (inference tensors keep none)."""
    return offsets.device.type != "cpu" and not offsets.is_inference()


def check_offsets_values(offsets: torch.Tensor, name: str, total: int, total_name: str,
                         max_len: int | None = None, max_len_name: str = "max_seqlen") -> int | None:
    """``offsets[0] == 0``, ``offsets[-1] == total`` and non-decreasing, and with ``max_len`` no segment longer
    than it (a kernel grid sized by ``max_len`` would leave longer segments' rows unwritten); raises ValueError
    naming the problem. Returns the longest segment, or None when the checks are off.

    One device sync on GPU, the first time a tensor is checked: a GPU tensor that passed remembers it, with its
    version counter (an in-place change checks it again), so the layers of a model that share one ``cu_seqlens``
    sync once per forward, not once per layer. A CPU tensor is checked every time (no sync to save, a few µs), since
    writes that bypass the version counter (through numpy or ``.data``, as a collate buffer reused batch after
    batch would) are common there. The detailed message is only computed on failure.
    """
    if not _value_checks_enabled(offsets):
        return None
    version = offsets._version if _remembers(offsets) else None
    passed = getattr(offsets, "_mdus_offsets_passed", None)
    if version is not None and passed is not None and passed[:2] == (version, total):
        longest = passed[2]
    else:
        o = offsets.long()
        lengths = o[1:] - o[:-1]
        longest = lengths.max() if lengths.numel() else o.new_zeros(())
        first, last, n_bad, longest = torch.stack([o[0], o[-1], (lengths < 0).sum(), longest]).tolist()
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if n_bad:
            i = int(torch.nonzero(o[1:] < o[:-1])[0])
            raise ValueError(f"{name} must be non-decreasing, got "
                             f"{name}[{i}]={int(o[i])} > {name}[{i + 1}]={int(o[i + 1])}")
        if last != total:
            raise ValueError(f"{name}[-1] must equal {total_name}={total}, got {last}")
        if version is not None:
            offsets._mdus_offsets_passed = (version, total, longest)
    if max_len is not None and longest > max_len:
        raise ValueError(f"{max_len_name}={max_len} is smaller than the longest sequence in {name} ({longest})")
    return longest


def longest_segment(offsets: torch.Tensor, name: str, total: int, total_name: str) -> int:
    """The longest segment of valid ``offsets`` (checked as by ``check_offsets_values``, in the same sync)."""
    longest = check_offsets_values(offsets, name, total, total_name)
    if longest is None:  # checks off
        longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return longest
