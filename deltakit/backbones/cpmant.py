"""CPM-Ant, natively: the model of CPM-Live's `cpm-ant` branch in one file, with its state_dict keys,
so an official `cpm-ant-10b.pt` loads unchanged (`load_cpmant`).

What makes CPM-Ant CPM-Ant, and what transformers' `CpmAntForCausalLM` does not reproduce:
* pre-norm RMSNorm, no biases, gated-GELU FFN; input and output embeddings tied;
* the 1/sqrt(d) parameterisation: weights are stored N(0, 1)-sized and every Linear multiplies its
  output by dim_in**-0.5, embeddings return E[id] / sqrt(d) and logits are (h / sqrt(d)) E^T;
* the first `prompt_length` positions of `input` are prompt ids (task_id * prompt_length + k) into
  `prompt_embedding`; `segment` ids add a segment embedding and select the position bias;
* a bucketed relative position bias (T5 buckets inside a segment, one learned bias per segment
  pair across segments);
* a prefix-LM mask: token i sees token j when j is context, or when i is not context and j <= i;
  tokens of different `span`s (packed samples) never see each other; padding is cut by `length`.
  transformers' forward sets context = 1 everywhere, i.e. attends bidirectionally: not usable for
  training a language model.

Compressed CPM-Ant models (7B/3B/1B/300M) drop the attention or the FFN of some layers:
`CPMAntConfig.mask_modules[i] = (no_attention, no_ffn)`; such a layer has no `self_att`/`ffn` child,
as in CPM-Live, so their checkpoints load too.

Delta hook points: `Attention.kv_prefix` (prefix deltas; see `Attention.forward`) and the native
prompt rows `prompt_embedding` (prompt deltas). Linear subclasses nn.Linear so deltakit and PEFT treat
it as a projection; `weight_scale` tells deltakit's merge that the effective weight is scale * weight.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, DeltakitError


@dataclass(frozen=True)
class CPMAntConfig:
    vocab_size: int = 30720
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    dropout_p: float = 0.0
    eps: float = 1e-6
    position_bias_num_buckets: int = 512
    position_bias_max_distance: int = 2048
    prompt_types: int = 32
    prompt_length: int = 32
    segment_types: int = 32
    mask_modules: tuple | None = None   # per layer (no_attention, no_ffn); None = every layer has both

    def __post_init__(self):
        if self.mask_modules is not None:
            object.__setattr__(self, "mask_modules", tuple(tuple(bool(x) for x in m) for m in self.mask_modules))
            if len(self.mask_modules) != self.num_layers:
                raise DeltakitError(f"mask_modules has {len(self.mask_modules)} entries for {self.num_layers} "
                                    f"layers; give one (no_attention, no_ffn) pair per layer")

    def layer_has(self, i: int) -> tuple[bool, bool]:
        """(has attention, has FFN) of layer i."""
        if self.mask_modules is None:
            return True, True
        return not self.mask_modules[i][0], not self.mask_modules[i][1]

    @classmethod
    def from_json(cls, path) -> "CPMAntConfig":
        """Read a CPM-Live config JSON (e.g. `config/cpm-ant-10b.json`); keys CPM-Live adds for its own
        runtime (`half`, `dtype`, `cls_head`...) are ignored, unknown model keys are an error."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f for f in cls.__dataclass_fields__}
        runtime = {"half", "dtype", "cls_head", "init_std", "use_cache", "model_type"}
        unknown = sorted(set(data) - known - runtime)
        if unknown:
            raise DeltakitError(f"{path}: unknown CPM-Ant config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")


def _pruned(n_layers, keep_att, keep_ffn):
    """Masks for a compressed model. Which layers BMCook pruned is not public (the configs ship
    only inside the checkpoint zips): we drop the last ones. Load the real JSON for a real model."""
    return tuple((i >= keep_att, i >= keep_ffn) for i in range(n_layers))


# Published shapes (CPM-Live README / config JSON). For the compressed sizes only the hidden size and
# the kept layers are public; dim_ff and heads are our assumption, chosen so that the totals match the
# names (6.6B, 2.6B, 1.1B, 0.32B). A real compressed checkpoint comes with its JSON: load that.
CONFIGS = {
    "cpm-ant-10b": CPMAntConfig(),
    "cpm-ant-7b": CPMAntConfig(mask_modules=_pruned(48, 37, 32)),
    "cpm-ant-3b": CPMAntConfig(dim_model=2560, dim_ff=6400, num_heads=20, mask_modules=_pruned(48, 37, 32)),
    "cpm-ant-1b": CPMAntConfig(dim_model=2048, dim_ff=5120, num_heads=16, mask_modules=_pruned(48, 25, 21)),
    "cpm-ant-300m": CPMAntConfig(dim_model=512, dim_ff=6144, num_heads=32, dim_head=64,
                                 mask_modules=_pruned(48, 25, 21)),
    "tiny": CPMAntConfig(vocab_size=96, dim_model=32, dim_ff=64, num_layers=2, num_heads=4, dim_head=8,
                         position_bias_num_buckets=32, position_bias_max_distance=64,
                         prompt_types=4, prompt_length=4, segment_types=4),
}


def config(name_or_path) -> CPMAntConfig:
    """A named config (see CONFIGS) or a CPM-Live config JSON path."""
    if isinstance(name_or_path, CPMAntConfig):
        return name_or_path
    if str(name_or_path) in CONFIGS:
        return CONFIGS[str(name_or_path)]
    if Path(name_or_path).is_file():
        return CPMAntConfig.from_json(name_or_path)
    raise DeltakitError(f"unknown CPM-Ant config {name_or_path!r}: give one of {sorted(CONFIGS)} or a config JSON path")


def num_params(cfg: CPMAntConfig) -> int:
    """Closed-form parameter count (what `sum(p.numel())` of the built model gives)."""
    d, ff = cfg.dim_model, cfg.dim_ff
    inner = cfg.num_heads * cfg.dim_head
    att, ffn = d + 4 * d * inner, d + 3 * d * ff
    layers = sum(has_a * att + has_f * ffn for has_a, has_f in map(cfg.layer_has, range(cfg.num_layers)))
    embeddings = (cfg.vocab_size + cfg.prompt_types * cfg.prompt_length + cfg.segment_types) * d
    bias = (cfg.segment_types ** 2 + cfg.position_bias_num_buckets) * cfg.num_heads
    return layers + d + embeddings + bias


# ---- layers ------------------------------------------------------------------------------------

class Linear(nn.Linear):
    """y = (x W^T) / sqrt(dim_in), W stored N(0, 1)-sized as CPM-Live does. No bias."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(dim_in, dim_out, bias=False)
        self.weight_scale = dim_in ** -0.5

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=1.0)

    def forward(self, x):
        return F.linear(x, self.weight) * self.weight_scale


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight only; the variance in fp32 as CPM-Live computes it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Embedding(nn.Module):
    """E[id] / sqrt(d); `projection` is the tied output layer, (h / sqrt(d)) E^T."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.scale = dim ** -0.5

    def forward(self, ids):
        return F.embedding(ids, self.weight) * self.scale

    def projection(self, h):
        return F.linear(h * self.scale, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.num_heads, self.dim_head = cfg.num_heads, cfg.dim_head
        inner = cfg.num_heads * cfg.dim_head
        self.project_q = Linear(cfg.dim_model, inner)
        self.project_k = Linear(cfg.dim_model, inner)
        self.project_v = Linear(cfg.dim_model, inner)
        self.attention_out = Linear(inner, cfg.dim_model)
        self.dropout_p = cfg.dropout_p
        # Prefix deltas set this to a callable batch_size -> (k, v), each (batch, heads, n, dim_head):
        # n extra keys/values that every query sees, with no position bias.
        self.kv_prefix = None

    def forward(self, x, bias, past=None):
        """x: (B, T, d); bias: (B, H, T, S) additive (position bias + -inf where masked), S = keys
        without any prefix; past: cached (k, v) or None. Returns (output, (k, v) to cache)."""
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.num_heads, self.dim_head).transpose(1, 2)
        q, k, v = split(self.project_q(x)), split(self.project_k(x)), split(self.project_v(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        elif self.kv_prefix is not None:   # prefix enters the cache once, with the first tokens
            pk, pv = self.kv_prefix(B)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        extra = k.size(2) - bias.size(-1)   # prefix columns: visible, no position bias
        if extra:
            bias = F.pad(bias, (extra, 0))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.attention_out(out.transpose(1, 2).reshape(B, T, -1)), (k, v)


class SelfAttentionBlock(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.layernorm_before_attention = RMSNorm(cfg.dim_model, cfg.eps)
        self.self_attention = Attention(cfg)

    def forward(self, h, bias, past=None):
        out, kv = self.self_attention(self.layernorm_before_attention(h), bias, past)
        return h + out, kv


class DenseGatedACT(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.w_0 = Linear(cfg.dim_model, cfg.dim_ff)   # gate, through GELU
        self.w_1 = Linear(cfg.dim_model, cfg.dim_ff)

    def forward(self, x):
        return F.gelu(self.w_0(x)) * self.w_1(x)


class FeedForward(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.w_in = DenseGatedACT(cfg)
        self.dropout = nn.Dropout(cfg.dropout_p)
        self.w_out = Linear(cfg.dim_ff, cfg.dim_model)

    def forward(self, x):
        return self.w_out(self.dropout(self.w_in(x)))


class FFNBlock(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.layernorm_before_ffn = RMSNorm(cfg.dim_model, cfg.eps)
        self.ffn = FeedForward(cfg)

    def forward(self, h):
        return h + self.ffn(self.layernorm_before_ffn(h))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: CPMAntConfig, has_attention=True, has_ffn=True):
        super().__init__()
        if has_attention:
            self.self_att = SelfAttentionBlock(cfg)
        if has_ffn:
            self.ffn = FFNBlock(cfg)

    def forward(self, h, bias, past=None):
        kv = None
        if hasattr(self, "self_att"):
            h, kv = self.self_att(h, bias, past)
        if hasattr(self, "ffn"):
            h = self.ffn(h)
        return h, kv


class Encoder(nn.Module):
    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg, *cfg.layer_has(i)) for i in range(cfg.num_layers))
        self.output_layernorm = RMSNorm(cfg.dim_model, cfg.eps)
        self.gradient_checkpointing = False

    def forward(self, h, bias, cache=None):
        new_cache = []
        for i, layer in enumerate(self.layers):
            past = cache[i] if cache else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, kv = checkpoint(layer, h, bias, past, use_reentrant=False)
            else:
                h, kv = layer(h, bias, past)
            new_cache.append(kv)
        return self.output_layernorm(h), new_cache


class SegmentPositionEmbedding(nn.Module):
    """Bias per (query, key) and head: bidirectional T5 buckets of key - query inside a segment, one
    learned bias per (query segment, key segment) pair across segments."""

    def __init__(self, cfg: CPMAntConfig):
        super().__init__()
        self.num_segments, self.num_buckets = cfg.segment_types, cfg.position_bias_num_buckets
        self.max_distance = cfg.position_bias_max_distance
        self.relative_attention_bias = nn.Parameter(
            torch.zeros(cfg.segment_types ** 2 + cfg.position_bias_num_buckets, cfg.num_heads))

    def forward(self, query_segment, key_segment, query_offset: int = 0):
        """query_segment (B, T), key_segment (B, S); queries are positions query_offset.. of keys."""
        T, S = query_segment.size(1), key_segment.size(1)
        device = key_segment.device
        with torch.no_grad():
            relative = (torch.arange(S, device=device)[None, :]
                        - torch.arange(query_offset, query_offset + T, device=device)[:, None])
            same = query_segment[:, :, None] == key_segment[:, None, :]
            bucket = torch.where(same, self._bucket(relative)[None],
                                 query_segment[:, :, None] * self.num_segments + key_segment[:, None, :]
                                 + self.num_buckets)
        return F.embedding(bucket, self.relative_attention_bias).permute(0, 3, 1, 2)   # (B, H, T, S)

    def _bucket(self, relative):
        half = self.num_buckets // 2           # keys after the query get the upper half
        bucket = (relative > 0).long() * half
        distance = relative.abs()
        exact = half // 2                      # small distances get a bucket each, larger ones log-spaced
        large = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                         * (half - exact)).long()
        return bucket + torch.where(distance < exact, distance, large.clamp(max=half - 1))


# ---- the model ---------------------------------------------------------------------------------

class CPMAnt(nn.Module):
    def __init__(self, cfg: CPMAntConfig | str = "cpm-ant-10b"):
        super().__init__()
        cfg = config(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.prompt_embedding = Embedding(cfg.prompt_types * cfg.prompt_length, cfg.dim_model)
        self.segment_embedding = Embedding(cfg.segment_types, cfg.dim_model)
        self.input_embedding = Embedding(cfg.vocab_size, cfg.dim_model)
        self.position_bias = SegmentPositionEmbedding(cfg)

    def get_input_embeddings(self):
        return self.input_embedding

    def forward(self, input, length=None, context=None, segment=None, span=None, cache=None, valid=None):
        """CPM-Live's forward. All (B, L) tensors describe the whole sequence, L = cached + new:
        input[:, :prompt_length] are prompt ids, the rest vocab ids (with `cache`, `input` holds only
        the new tokens); `length` (B,) counts the valid positions including the prompt, padding on
        the right, or `valid` (B, L) marks them anywhere (generation pads between prompt and text);
        `context` marks tokens every position may see; `segment` ids; `span` ids (default all 0).
        Returns (logits (B, T_new, vocab), hidden states, cache for the next call); a cache is
        {"length": tokens cached, "kv": per-layer (k, v) or None for layers without attention}."""
        P = self.config.prompt_length
        past = cache["length"] if cache else 0
        L = segment.size(1)
        span = torch.zeros_like(segment) if span is None else span
        if past == 0:
            h = torch.cat([self.prompt_embedding(input[:, :P]), self.input_embedding(input[:, P:])], dim=1)
        else:
            h = self.input_embedding(input)
        h = h + self.segment_embedding(segment[:, past:])
        bias = self.position_bias(segment[:, past:], segment, query_offset=past)
        if valid is None:
            valid = torch.arange(L, device=segment.device)[None, :] < length[:, None]
        bias = bias.masked_fill(~self.attention_mask(valid, context, span)[:, None, past:], float("-inf"))
        h, kv = self.encoder(h, bias, cache["kv"] if cache else None)
        return self.input_embedding.projection(h), h, {"length": L, "kv": kv}

    @staticmethod
    def attention_mask(valid, context, span):
        """(B, L, L) bool: query i may see key j."""
        L = context.size(1)
        idx = torch.arange(L, device=context.device)
        context, valid = context.bool(), valid.bool()
        see = context[:, None, :] | (~context[:, :, None] & (idx[None, :] <= idx[:, None]))
        see = see & (span[:, None, :] == span[:, :, None])
        see = see & valid[:, :, None] & valid[:, None, :]
        # A padded query that sees nothing would get NaN from softmax, and NaN * 0 still poisons the
        # real tokens through the next layer's values: let every position see itself.
        return see | torch.eye(L, dtype=torch.bool, device=context.device)

    def inputs(self, token_ids: list[list[int]], **kwargs) -> dict:
        """`make_inputs` for this model's config."""
        return make_inputs(self.config, token_ids, **kwargs)


def make_inputs(cfg: CPMAntConfig, token_ids: list[list[int]], task_id: int = 1, context=None, segment: int = 2,
                device=None) -> dict:
    """CPM-Live-style inputs for a batch of token id lists, padded on the right: the task's prompt
    ids first (segment 0), then the tokens (segment `segment`, 2 = LM text). `context[b]` is the
    number of leading tokens of sample b that are context (default: all of them)."""
    P = cfg.prompt_length
    if not 0 <= task_id < cfg.prompt_types:
        raise DeltakitError(f"task_id={task_id} is out of range: this model has {cfg.prompt_types} prompt types")
    width = P + max(len(t) for t in token_ids)
    out = {k: torch.zeros(len(token_ids), width, dtype=torch.long) for k in ("input", "context", "segment")}
    out["length"] = torch.tensor([P + len(t) for t in token_ids])
    for b, ids in enumerate(token_ids):
        n_ctx = len(ids) if context is None else context[b]
        out["input"][b, :P] = torch.arange(P) + task_id * P
        out["input"][b, P:P + len(ids)] = torch.tensor(ids, dtype=torch.long)
        out["context"][b, :P + n_ctx] = 1
        out["segment"][b, P:P + len(ids)] = segment
    return {k: v.to(device) for k, v in out.items()}


# ---- loading -----------------------------------------------------------------------------------

def build(cfg="cpm-ant-10b", dtype=torch.float32, device="cpu") -> CPMAnt:
    """A randomly initialised model (N(0,1) Linear weights, as CPM-Live initialises them). On
    device="meta" it costs no memory: use it to count parameters or plan deltas."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build in the target dtype: a 10B model never exists in fp32
    try:
        with torch.device(device):
            model = CPMAnt(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


# ---- finding a checkpoint laid out as CPM-Live ships it ------------------------------------------

CHECKPOINT_SUFFIXES = (".pt", ".bin", ".safetensors")


def is_config_file(path: Path) -> bool:
    """A CPM-Live config JSON: a few hundred bytes with dim_model and prompt_length (a Hugging Face
    folder's tokenizer.json, 17 MB for e5, is never parsed)."""
    path = Path(path)
    if path.suffix != ".json" or path.stat().st_size > 64 * 1024:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "dim_model" in data and "prompt_length" in data


def native_files(path) -> tuple[Path, Path | None, Path | None] | None:
    """(checkpoint, config JSON, vocab) of a native CPM-Ant path: the checkpoint file, or its folder,
    with CPM-Live's config JSON (the one named as the checkpoint, or the only one) and vocab (ant.txt,
    vocab.txt, or the only .txt) beside it; None (config, vocab) where there is none, None in all when
    `path` is not a CPM-Ant checkpoint. A folder with a config and not exactly one checkpoint is an error."""
    path = Path(path)
    if not (path.is_dir() or (path.is_file() and path.suffix in CHECKPOINT_SUFFIXES)):
        return None
    folder = path if path.is_dir() else path.parent
    configs = [p for p in sorted(folder.glob("*.json")) if is_config_file(p)]
    if path.is_dir():
        if not configs:
            return None
        found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) != 1:
            raise CheckpointError(f"{path} has a CPM-Ant config but {len(found)} checkpoint files "
                                  f"({', '.join(p.name for p in found) or 'none'}); pass the checkpoint file itself")
        path = found[0]
    config = next((p for p in configs if p.stem == path.stem), configs[0] if len(configs) == 1 else None)
    vocabs = sorted(folder.glob("*.txt"))
    vocab = next((p for p in vocabs if p.name in ("ant.txt", "vocab.txt")), vocabs[0] if len(vocabs) == 1 else None)
    return path, config, vocab


def read_state_dict(path) -> dict:
    """Tensors from a `.safetensors` file or a torch checkpoint (`.pt`, `.bin`), read without
    unpickling arbitrary objects (torch.load(weights_only=True))."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:   # weights_only refuses pickled code objects, mmap old formats
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"{path} could not be read as plain tensors ({e}); deltakit does not unpickle "
                                  f"arbitrary objects: re-save it with torch.save(state_dict) or as safetensors") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_cpmant(path, cfg="cpm-ant-10b", dtype=torch.bfloat16, device="cpu") -> CPMAnt:
    """Load an official CPM-Live checkpoint (e.g. cpm-ant-10b.pt) into the native model: built on the
    meta device, then the checkpoint's tensors are assigned, so the weights exist once in memory."""
    sd = read_state_dict(path)
    model = build(cfg, dtype=dtype, device="meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit CPM-Ant config {config(cfg)}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
                              f"Is it a CPM-Live CPM-Ant checkpoint of this size (see CONFIGS or pass its config JSON)?")
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes differ from the config: {bad[:5]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model.eval()
