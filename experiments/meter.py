"""A live-tensor-bytes meter that works on any device, the CPU included. It needs torch's dispatch
hooks (private modules), which is why it lives here and not in sekd.py."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """While active, every storage an op makes counts until it is freed; `peak` is the most bytes alive
    at once. Not counted: tensors made before (weights, AdamW state), a kernel's scratch, an output
    sharing an input's storage (in place, views). `match(t)`, optional, picks tensors also counted in
    `matched_live` / `matched_peak` and listed in `log` (e.g. the [rows, V] logits)."""

    def __init__(self, match=None):
        super().__init__()
        self.live = self.peak = self.matched_live = self.matched_peak = 0
        self.match, self.log, self._seen = match, [], set()

    def _free(self, key, nbytes, matched):
        self._seen.discard(key)
        self.live -= nbytes
        self.matched_live -= nbytes if matched else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        for t in (t for t in tree_flatten(out)[0] if torch.is_tensor(t)):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._seen and key not in inputs:
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                matched = self.match is not None and bool(self.match(t))
                if matched:
                    self.matched_live += nbytes
                    self.matched_peak = max(self.matched_peak, self.matched_live)
                    self.log.append((str(func.overloadpacket.__name__), tuple(t.shape), t.dtype, nbytes))
                weakref.finalize(storage, self._free, key, nbytes, matched)
        return out


def state_bytes(*tensors_or_modules):
    """Bytes held by the parameters and buffers of modules, or by plain tensors."""
    ts = [t for x in tensors_or_modules
          for t in (list(x.parameters()) + list(x.buffers()) if isinstance(x, torch.nn.Module) else [x])]
    return sum(t.numel() * t.element_size() for t in ts)
