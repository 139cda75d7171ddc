"""Count host synchronisations on CPU: the calls that, on a CUDA device, make the host wait for
the device's queue (reading a value, or an output whose size depends on the values).

On CPU every tensor is a host tensor, so the counter tells them apart itself: ``.cpu()`` counts
once and marks its result as host memory, everything computed only from host tensors stays
host memory (reading it costs nothing), and moving it with ``.to(device)`` makes it a device
tensor again. ``host_result`` marks what a compiled host kernel returns.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops whose CUDA implementations read values back to the host.
READ_BACK = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.bincount.default, aten.equal.default, aten.is_nonzero.default, aten._unique2.default,
             aten.unique_consecutive.default, aten.unique_dim.default}


def host_result(tensor):
    tensor._host = True
    return tensor


def _is_host(tensor):
    return getattr(tensor, "_host", False)


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _reads_back(func, args, kwargs):
    if func in READ_BACK:
        return True
    if func is aten.repeat_interleave.Tensor:  # without output_size its size is read back
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):  # boolean masks
        return any(t.dtype == torch.bool for t in _tensors(args[1:2]))
    return False


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as syncs: ...`` then ``syncs.count`` and ``syncs.where`` (op names)."""

    def __init__(self):
        super().__init__()
        self.where = []
        self._patched = {}

    @property
    def count(self):
        return len(self.where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        on_host = bool(inputs) and all(_is_host(t) for t in inputs)
        if not on_host and _reads_back(func, args, kwargs):
            self.where.append(str(func))
        out = func(*args, **kwargs)
        if on_host:
            for tensor in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                host_result(tensor)
        return out

    def _patch(self, name, method):
        self._patched[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, method)

    def __enter__(self):
        cpu, tolist, numpy, to = (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.to)
        syncs = self

        def counted_cpu(tensor, *args, **kwargs):
            if not _is_host(tensor):
                syncs.where.append("Tensor.cpu")
            return host_result(cpu(tensor, *args, **kwargs).clone())

        def counted(read, name):
            def method(tensor, *args, **kwargs):
                if not _is_host(tensor):
                    syncs.where.append(f"Tensor.{name}")
                return read(tensor, *args, **kwargs)
            return method

        def moved(tensor, *args, **kwargs):
            out = to(tensor, *args, **kwargs)
            if _is_host(tensor) and (args and isinstance(args[0], (torch.device, str)) or "device" in kwargs):
                out = out.clone()  # a device copy: no longer host memory
                out._host = False
            return out

        self._patch("cpu", counted_cpu)
        self._patch("tolist", counted(tolist, "tolist"))
        self._patch("numpy", counted(numpy, "numpy"))
        self._patch("to", moved)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._patched.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)
