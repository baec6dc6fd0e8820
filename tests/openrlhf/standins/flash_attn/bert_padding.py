"""Stand-in: the names openrlhf.models.ring_attn_utils imports; none may be called on CPU."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash-attn stand-in: packing/ring attention is not available in CPU tests")


index_first_axis = pad_input = rearrange = unpad_input = _unavailable
