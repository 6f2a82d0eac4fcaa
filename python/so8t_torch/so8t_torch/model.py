"""An SO8T model on a transformers causal LM (SO8T_SPEC.md §4-§5).

Gates are forward hooks: the q, k, v gates rotate the outputs of q_proj, k_proj, v_proj (or
the three slices of a fused qkv_proj) before q/k norms and RoPE; the o gate rotates
o_proj's input; the mlp gate the MLP's input. A site's rotation is built from its
generators at every forward (differentiable), `R = R_last · … · R_first` over the factors,
head h in family h mod 3. The heads read the residual after block `layer`, RMS-normed with
unit weight (the final normed state for `layer = L`). The base weights are frozen.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from .algebra import family_generators, skew

SITES = ("q", "k", "v", "o", "mlp")
HEADS = ("safety", "authority")
ADAPTER_FILE = "so8t_adapter.safetensors"
CONFIG_FILE = "so8t_config.json"


def generator_name(layer, site, factor):
    return f"layers.{layer}.{site}.{factor}.generators"


class So8tModel(torch.nn.Module):
    """`base` (a transformers causal LM, frozen) with the gates and heads of `config` (the
    parsed `so8t_config.json`). Parameters: `generators[...]` (`[n, 28]` each, keyed
    `layers.L.SITE.FACTOR.generators` with dots as `/`) and `heads`."""

    def __init__(self, base, config: dict):
        super().__init__()
        self.base = base
        self.config = config
        for p in base.parameters():
            p.requires_grad_(False)
        # A vision-language base (Qwen2-VL) keeps the decoder's settings in its text config
        # and its layers under `language_model`; the gates and heads are the decoder's.
        c = self.text_config = base.config.get_text_config()
        self.decoder = getattr(base.model, "language_model", base.model)
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_layers = c.num_hidden_layers
        self.eps = c.rms_norm_eps
        self.generators = torch.nn.ParameterDict()
        for l in range(self.n_layers):
            for site in config["sites"]:
                n = self.site_shape(site)[2]
                for f in config["factors"]:
                    self.generators[generator_name(l, site, f).replace(".", "/")] = torch.nn.Parameter(torch.zeros(n, 28))
        self.heads = torch.nn.ModuleDict({h: torch.nn.Linear(c.hidden_size, 2) for h in HEADS})
        for h in self.heads.values():
            torch.nn.init.zeros_(h.weight)
            torch.nn.init.zeros_(h.bias)
        self._rot = {}
        self._taps = {}
        self._install_hooks()

    # -- files -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, so8t_dir, dtype=torch.float32):
        """An SO8T directory (the base model's files, untouched, plus the adapter)."""
        d = Path(so8t_dir)
        config = json.loads((d / CONFIG_FILE).read_text())
        auto = AutoModelForImageTextToText if "vision_config" in json.loads((d / "config.json").read_text()) else AutoModelForCausalLM
        base = auto.from_pretrained(d, dtype=dtype)
        model = cls(base, config)
        model.load_adapter(d / ADAPTER_FILE)
        return model

    def load_adapter(self, path):
        t = load_file(str(path))
        for k, p in self.generators.items():
            name = k.replace("/", ".")
            if name not in t or t[name].shape != p.shape:
                raise ValueError(f"{path}: tensor `{name}` missing or not of shape {list(p.shape)}")
            p.data.copy_(t[name].to(p.dtype))
        for h, lin in self.heads.items():
            lin.weight.data.copy_(t[f"heads.{h}.weight"])
            lin.bias.data.copy_(t[f"heads.{h}.bias"])

    def save_pretrained(self, out_dir, base_dir=None, heads_trained=None):
        """Writes `so8t_adapter.safetensors` and `so8t_config.json` into `out_dir`, and the
        base model's files from `base_dir` if given (an SO8T directory is the base's files
        plus these two)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if base_dir is not None:
            for f in Path(base_dir).iterdir():
                if f.is_file() and f.name not in (ADAPTER_FILE, CONFIG_FILE):
                    shutil.copy(f, out / f.name)
        tensors = {k.replace("/", "."): p.detach().float().contiguous().cpu() for k, p in self.generators.items()}
        for h, lin in self.heads.items():
            tensors[f"heads.{h}.weight"] = lin.weight.detach().float().contiguous().cpu()
            tensors[f"heads.{h}.bias"] = lin.bias.detach().float().contiguous().cpu()
        save_file(tensors, str(out / ADAPTER_FILE))
        config = dict(self.config)
        if heads_trained is not None:
            config["heads_trained"] = heads_trained
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    # -- gates -------------------------------------------------------------------------

    def site_shape(self, site):
        """(heads, blocks per head, generators) of a site (spec §4)."""
        c = self.text_config
        heads = {"q": c.num_attention_heads, "o": c.num_attention_heads, "k": c.num_key_value_heads,
                 "v": c.num_key_value_heads, "mlp": c.hidden_size // 8}[site]
        bph = 1 if site == "mlp" else self.hd // 8
        per_unit = site == "mlp" or self.config["granularity"] == "per_head"
        return heads, bph, heads * bph if per_unit else bph

    def rotation(self, layer, site):
        """`[units, 8, 8]`: the site's gate, unit by unit."""
        heads, bph, n_gen = self.site_shape(site)
        units = torch.arange(heads * bph)
        head = units // bph
        gen = units if n_gen == heads * bph else units % bph
        total = None
        for f in self.config["factors"]:
            g = self.generators[generator_name(layer, site, f).replace(".", "/")]
            fams = torch.stack([torch.linalg.matrix_exp(skew(x)) for x in family_generators(g)])  # [3, n, 8, 8]
            r = fams[head % 3, gen]
            total = r if total is None else r @ total
        return total

    @staticmethod
    def rotate(x, r):
        shp = x.shape
        y = torch.einsum("uij,...uj->...ui", r.to(x.dtype), x.reshape(*shp[:-1], r.shape[0], 8))
        return y.reshape(shp)

    def _install_hooks(self):
        c = self.text_config
        q_w, kv_w = c.num_attention_heads * self.hd, c.num_key_value_heads * self.hd
        rot = lambda l, s: self._rot.get((l, s))

        def out_hook(l, s):
            return lambda m, i, o: o if rot(l, s) is None else self.rotate(o, rot(l, s))

        def in_hook(l, s):
            return lambda m, i: None if rot(l, s) is None else (self.rotate(i[0], rot(l, s)),) + tuple(i[1:])

        for l, layer in enumerate(self.decoder.layers):
            at = layer.self_attn
            if hasattr(at, "qkv_proj"):
                def qkv(m, i, o, l=l):
                    parts = [o[..., :q_w], o[..., q_w:q_w + kv_w], o[..., q_w + kv_w:]]
                    return torch.cat([p if rot(l, s) is None else self.rotate(p, rot(l, s)) for p, s in zip(parts, "qkv")], -1)
                at.qkv_proj.register_forward_hook(qkv)
            else:
                for s in "qkv":
                    getattr(at, f"{s}_proj").register_forward_hook(out_hook(l, s))
            at.o_proj.register_forward_pre_hook(in_hook(l, "o"))
            layer.mlp.register_forward_pre_hook(in_hook(l, "mlp"))
            layer.register_forward_hook(lambda m, i, o, l=l: self._taps.__setitem__(l + 1, o[0] if isinstance(o, tuple) else o))
        self.decoder.norm.register_forward_hook(lambda m, i, o: self._taps.__setitem__("final", o))

    # -- forward -----------------------------------------------------------------------

    def head_layer(self, head):
        return (self.config.get("heads", {}).get(head) or {}).get("layer") or self.n_layers

    def state(self, layer):
        """What a head reading `layer` sees at every position of the last forward."""
        if layer == self.n_layers:
            return self._taps["final"]
        x = self._taps[layer].float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, input_ids, attention_mask=None, **inputs):
        """`(logits, final hidden states, {head: head logits})` for `input_ids` `[b, s]`;
        `inputs` are the base's others (a vision model's `pixel_values`, `image_grid_thw`,
        `mm_token_type_ids`)."""
        self._rot = {(l, s): self.rotation(l, s) for l in range(self.n_layers) for s in self.config["sites"]}
        self._taps = {}
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        heads = {h: self.heads[h](self.state(self.head_layer(h)).to(self.heads[h].weight.dtype)) for h in HEADS}
        hidden = self._taps["final"]
        self._rot = {}
        return out.logits, hidden, heads

    @torch.no_grad()
    def verdicts(self, head_logits):
        """p(unsafe), p(escalate) per position from the head logits of `forward`."""
        return {"p_unsafe": torch.softmax(head_logits["safety"], -1)[..., 1],
                "p_escalate": torch.softmax(head_logits["authority"], -1)[..., 1]}
