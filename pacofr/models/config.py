"""`ModelConfig`: every flag of the PaCo-FR model (method.md), with its default and presets.

The field types are ``Literal`` / plain types so that YAML configs and ``--set model.x=value``
overrides are checked (see :mod:`pacofr.train.fields`). Defaults are method.md's (ViT-B/16 at
224 px); :meth:`ModelConfig.preset` gives smaller encoders, including the CPU ``demo``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["paco", "mae", "mcf", "fra"]
MaskMode = Literal["region", "random", "block"]
RegionSource = Literal["template", "landmarks"]
ReplaceFrom = Literal["visible", "masked", "all"]
EncoderMask = Literal["drop", "mask_token"]
EncoderPos = Literal["fixed", "learned"]
BeliefInput = Literal["pixels", "context"]
BeliefAfter = Literal["off", "decay", "keep_small"]
CodeUpdate = Literal["grad", "ema"]
Target = Literal["norm_pix", "pixels"]
RecOn = Literal["masked+replaced", "all"]
SpatialConsistency = Literal["layout", "relation", "equivariance", "off"]
IncubationPatches = Literal["all", "replaced"]
Backend = Literal["auto", "torch", "triton", "cuda"]
CodebookPrecision = Literal["ieee", "tf32x3", "tf32", "bf16"]
Prototypes = Literal["table", "linear"]
ProtoPatches = Literal["all", "replaced"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Largest patch count L per image: the attention scores of one head and image are L x L floats
#: (2^28 of them, 1 GiB in fp32, at this bound).
MAX_PATCHES = 2**14
#: Largest model accepted: 2^32 parameters are 64 GiB of fp32 weights, gradients and AdamW
#: moments (16 bytes each), more than one 80 GB accelerator holds with activations besides.
MAX_PARAMETERS = 2**32

_PRESETS: dict[str, dict[str, Any]] = {
    # smallest sensible model, for unit tests (L = 16 patches)
    "tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32,
                 decoder_depth=1, decoder_heads=2, codebook_size=64, code_dim=16, bp_hidden=32,
                 timm_name="vit_tiny_patch16_224"),
    # tiny enough for a few hundred steps on 2 CPU cores in minutes (L = 64 patches)
    "demo": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, decoder_dim=96,
                 decoder_depth=2, decoder_heads=4, codebook_size=256, code_dim=32, bp_hidden=128,
                 timm_name="vit_tiny_patch16_224"),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_dim=256, decoder_depth=4,
                     decoder_heads=8, codebook_size=2048, timm_name="vit_tiny_patch16_224"),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=4,
                      decoder_heads=8, codebook_size=4096, timm_name="vit_small_patch16_224"),
    "vit_base": dict(timm_name="vit_base_patch16_224"),
}


@dataclass
class ModelConfig:
    """Configuration of :class:`pacofr.models.paco.PaCoFR` (method.md "Design"; flags in brackets there).

    Groups: method; encoder (timm ViT); decoder; masking; codebook and Belief Predictor;
    incubation / end-to-end; reconstruction target; spatial consistency; loss weights; pixels;
    backend of the ops.
    """

    # --- method: "paco" = PaCo-FR; "mae" = MAE-face control (random mae_mask_ratio mask, no
    #     codebook, no spatial consistency; the masking / codebook / sc flags are then ignored);
    #     "mcf" / "fra": the MCF-style and FRA-style peers (their block at the end of this class)
    method: Method = "paco"

    # --- encoder: a plain timm VisionTransformer (class token, no classifier head)
    timm_name: str = "vit_base_patch16_224"  # timm architecture the encoder exports as
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    encoder_pos: EncoderPos = "fixed"  # fixed 2-D sin-cos (MAE) or learned from sin-cos init
    encoder_mask: EncoderMask = "drop"  # masked patches dropped (MAE) or fed as a mask token

    # --- MAE decoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    # --- masking: "random" (default) masks r_mask of the patches uniformly at random; "region" masks whole
    #     facial regions up to the budget (the earlier default); "block" one contiguous block
    mask_mode: MaskMode = "random"
    # how the data pipeline assigns region ids (the model takes ids): per face from its landmarks
    # (the template map where a face has none or they are degenerate), or the template for every face
    regions: RegionSource = "landmarks"
    num_regions: int = 14  # G (pacofr.data.regions: 8 facial components + 6 periphery regions)
    other_region: int = -1  # a region id never masked as a whole region, only to complete the budget; -1: none
    r_mask: float = 0.75  # masked fraction of the patches (MAE-face's mae_mask_ratio by default)
    r_rep: float = 0.1
    # where the replaced patches come from: "masked" (default) = n_rep of the n_mask masked patches enter the
    # encoder as code tokens; "visible" (the earlier default) = from the patches left visible; "all" = from
    # every patch, before the mask is drawn (docs/eval/screening/ for the choice of defaults)
    replace_from: ReplaceFrom = "masked"
    mae_mask_ratio: float = 0.75  # method="mae" and "mcf" only

    # --- patch codebook and Belief Predictor
    codebook_size: int = 4096  # K
    code_dim: int = 64  # dc
    bp_hidden: int = 512
    num_candidates: int = 4  # M
    tau_b: float = 0.1
    straight_through: bool = False
    codebook_decay: float = 0.99  # EMA decay of code usage (and of codes with code_update="ema")
    # usage is counted in units where a uniformly used code gets 1 per step (counts * K / N);
    # a code whose EMA usage falls below this is dead and restarted from a current belief q
    dead_code_threshold: float = 0.03
    dead_code_warmup: int = 100  # optimiser steps before the first restart (the EMA fills up)
    restart_dead_codes: bool = True

    # --- incubation (epoch 0), then end-to-end
    incubation_patches: IncubationPatches = "all"  # patches labelled with k* for L_bp / L_code
    code_update: CodeUpdate = "grad"
    bp_after: BeliefAfter = "off"
    bp_decay_half_life: int = 1000  # bp_after="decay": half-life of w_bp in optimiser steps
    bp_small_weight: float = 0.1  # bp_after="keep_small": weight of L_bp after incubation
    bp_input: BeliefInput = "pixels"

    # --- reconstruction
    target: Target = "norm_pix"
    norm_pix_eps: float = 1e-6
    rec_on: RecOn = "masked+replaced"
    # per-patch weight of a replaced patch in L_rec relative to a masked one (L_rec is the weighted mean
    # over the scored patches, so a replaced patch never weighs more than a masked one when <= 1)
    alpha_rep: float = 1.0

    # --- spatial consistency
    # relation (default): the EMA teacher's patch-relation term; layout (the earlier default): predict the
    # relative layout of the facial regions (pairwise centroid offsets in the augmented image) from the
    # encoder's pooled tokens; equivariance: the feature term under a known similarity transform
    sc: SpatialConsistency = "relation"
    sc_beta: float = 1.0  # weight of (1 - cos) at masked patches inside L_sc (relation)
    teacher_momentum: float = 0.996  # EMA teacher momentum at the start (cosine ramp to the end)
    teacher_momentum_end: float = 1.0
    eq_max_rotation: float = 10.0  # equivariance: degrees
    eq_max_scale: float = 0.1  # equivariance: scale in [1 - s, 1 + s]
    eq_max_shift: float = 0.1  # equivariance: fraction of the image size
    eq_min_overlap: float = 0.99  # equivariance: a feature counts as overlapping above this coverage

    # --- loss weights: L = L_rec + [incubation](w_bp L_bp + w_code L_code)
    #     + [after](w_align L_align + w_ctx L_ctx) + w_ent L_ent + w_sc L_sc
    w_bp: float = 1.0
    w_code: float = 1.0
    w_align: float = 0.5
    w_ent: float = 0.01
    w_sc: float = 0.1
    w_ctx: float = 1.0
    # method.md's "[epoch >= 1] 0.5 L_align + 0.01 L_ent + 0.1 L_sc" is ambiguous. True: the bracket
    # covers L_align only (the epoch-0 term is parenthesised, this one is not), so L_ent and L_sc
    # also act during incubation; False: L_ent and L_sc start with the end-to-end phase too.
    regularise_in_incubation: bool = True

    # ===== issue 16: components that do what their names say (docs/method.md "Design"; flags here) =====
    # codebook=False: PaCo-FR without the patch codebook (no replaced patches, no Belief Predictor),
    # the "codebook off" ablation; masking and spatial consistency unchanged
    codebook: bool = True
    # pixel prototype of each code: "table" = one norm-pix patch per code kept as an EMA k-means centroid
    # of the patches nearest to it (incubation: all patches, afterwards the replaced ones);
    # "linear" = code2pix(E_k), a Linear dc -> P fitted by L_code (the earlier design)
    prototypes: Prototypes = "table"
    # the patches whose nearest prototype updates the table after incubation ("all" costs one nearest-
    # prototype search over the B x L patches per step; "replaced": only the replaced ones)
    proto_patches: ProtoPatches = "all"
    # straight-through path from the soft token to the belief q (token + q - stopgrad(q)), so the Belief
    # Predictor gets reconstruction gradient at every num_candidates, M = 1 included
    bp_ste: bool = True
    # a code counts as rarely used when its (bias-corrected) EMA usage is below this fraction of uniform
    # usage; measured before the restarts of the step (stat low_usage_fraction)
    low_usage_threshold: float = 0.1
    # ===== end of issue 16 flags =====

    # --- pixels: encoder input is (image - pixel_mean) / pixel_std, image in [0, 1]
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    # --- backend of the pacofr.ops calls, and the precision of the codebook score products (the
    #     rankings of nearest_token / soft_assign and the belief softmaxes; pacofr.ops.precision).
    #     tf32: TF32 tensor cores on a GPU; on real face patches 99.98 % of the lookups and 99.2-99.9 %
    #     of the candidate sets equal float64's, and the demo loss curve is that of exact fp32
    #     (docs/precision). "ieee" is exact fp32; "bf16" is faster on paper but changes up to 6 % of
    #     the candidate sets and has no cuda-backend path for fp32 inputs.
    backend: Backend = "auto"
    codebook_precision: CodebookPrecision = "tf32"

    def __post_init__(self) -> None:
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(float(v) for v in self.pixel_std)  # type: ignore[assignment]
        self.validate()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset ("tiny" for tests, "demo", "vit_tiny", "vit_small", "vit_base") with
        ``overrides`` applied."""
        if name not in _PRESETS:
            raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`."""
        return tuple(_PRESETS)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for YAML / JSON / checkpoint metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    # ------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patches per side (img_size / patch_size)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, patches per image."""
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        """P = patch_size**2 * 3, pixel values per patch."""
        return self.patch_size * self.patch_size * 3

    @property
    def is_paco(self) -> bool:
        """True for PaCo-FR, False for the MAE-face control."""
        return self.method == "paco"

    @property
    def uses_codebook(self) -> bool:
        """Whether the model has the patch codebook and Belief Predictor (PaCo-FR with codebook=True)."""
        return self.is_paco and self.codebook

    @property
    def uses_layout(self) -> bool:
        """Whether L_sc is the region-layout term (PaCo-FR with sc="layout")."""
        return self.is_paco and self.sc == "layout"

    @property
    def uses_teacher(self) -> bool:
        """Whether the model keeps an EMA teacher of the encoder (PaCo-FR with sc != "off")."""
        return self.is_paco and self.sc in ("relation", "equivariance")

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model(timm_name, pretrained=False, **kwargs)`` that
        build exactly this encoder (no classifier head); its state_dict loads into that model."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    drop_path_rate=self.drop_path_rate, num_classes=0)

    def parameter_lower_bound(self) -> int:
        """A lower bound on the parameter count: the encoder's and decoder's attention and MLP
        matrices, the position embeddings and the codebook (biases, norms and heads left out)."""
        def blocks(depth: int, width: int) -> int:  # q, k, v, proj and the two MLP matrices
            return depth * (4 * width ** 2 + 2 * width * int(width * self.mlp_ratio))

        encoder, decoder = blocks(self.depth, self.embed_dim), blocks(self.decoder_depth, self.decoder_dim)
        positions = self.num_patches * (self.embed_dim + self.decoder_dim)
        codebook = self.codebook_size * self.code_dim if self.uses_codebook else 0
        return encoder + decoder + positions + codebook

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

        for name, hint in typing.get_type_hints(type(self)).items():  # choices, also from Python callers
            if typing.get_origin(hint) is Literal:
                choices = typing.get_args(hint)
                value = getattr(self, name)
                need(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")

        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_dim",
                     "decoder_depth", "decoder_heads", "codebook_size", "code_dim", "bp_hidden",
                     "num_candidates", "num_regions", "bp_decay_half_life"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.img_size % self.patch_size == 0,
             f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        need(self.embed_dim % self.num_heads == 0,
             f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        need(self.decoder_dim % self.decoder_heads == 0,
             f"decoder_dim={self.decoder_dim} must be divisible by decoder_heads={self.decoder_heads}")
        need(self.num_candidates <= self.codebook_size,
             f"num_candidates={self.num_candidates} must be <= codebook_size={self.codebook_size}")
        need(-1 <= self.other_region < self.num_regions,
             f"other_region must be -1 or a region id < num_regions={self.num_regions}, got {self.other_region}")
        for name in ("r_mask", "r_rep", "mae_mask_ratio", "codebook_decay", "low_usage_threshold"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        need(self.mae_mask_ratio < 1.0, f"mae_mask_ratio must be < 1, got {self.mae_mask_ratio}")
        length = self.num_patches
        n_mask, n_rep = round(self.r_mask * length), round(self.r_rep * length)
        if self.replace_from == "masked":
            need(n_rep <= n_mask, f"replace_from='masked' needs round(r_rep*L)={n_rep} <= round(r_mask*L)={n_mask}")
            need(n_mask < length, f"r_mask={self.r_mask} leaves no patch for the encoder (L={length})")
        else:
            need(n_mask + n_rep < length,
                 f"r_mask + r_rep leave no pixel patch for the encoder: round(r_mask*L)={n_mask} + "
                 f"round(r_rep*L)={n_rep} must be < L={length}")
        need(self.codebook or self.bp_input == "pixels", "bp_input='context' needs the codebook (codebook=True)")
        need(self.incubation_patches == "all" or n_rep >= 1,
             f"incubation_patches='replaced' needs replaced patches, but round(r_rep*L) = {n_rep}")
        need(self.tau_b > 0, f"tau_b must be > 0, got {self.tau_b}")
        need(0.0 <= self.teacher_momentum <= self.teacher_momentum_end <= 1.0,
             "need 0 <= teacher_momentum <= teacher_momentum_end <= 1, got "
             f"{self.teacher_momentum}, {self.teacher_momentum_end}")
        need(len(self.pixel_mean) == 3 and len(self.pixel_std) == 3, "pixel_mean and pixel_std need 3 values")
        need(all(s > 0 for s in self.pixel_std), f"pixel_std must be > 0, got {self.pixel_std}")
        need(self.norm_pix_eps > 0, f"norm_pix_eps must be > 0 (a constant patch has variance 0), got {self.norm_pix_eps}")
        need(0.0 <= self.eq_min_overlap <= 1.0, f"eq_min_overlap must be in [0, 1], got {self.eq_min_overlap}")
        for name in ("w_bp", "w_code", "w_align", "w_ent", "w_sc", "w_ctx", "alpha_rep", "sc_beta",
                     "bp_small_weight", "dead_code_threshold", "dead_code_warmup", "eq_max_rotation",
                     "eq_max_scale", "eq_max_shift", "drop_path_rate"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.eq_max_scale < 1, f"eq_max_scale must be < 1, got {self.eq_max_scale}")
        need(self.drop_path_rate < 1, f"drop_path_rate must be in [0, 1) (the probability of dropping a "
                                      f"block's branch), got {self.drop_path_rate}")
        need(int(self.embed_dim * self.mlp_ratio) >= 1,
             f"mlp_ratio must be > 0 (the MLP width is int(embed_dim * mlp_ratio) = "
             f"{int(self.embed_dim * self.mlp_ratio)}), got {self.mlp_ratio}")
        need(self.num_regions >= 2, f"num_regions must be >= 2 (masking and the layout term compare regions), "
                                    f"got {self.num_regions}")
        need(bool(self.timm_name.strip()), "timm_name must name a timm VisionTransformer "
                                           "(e.g. vit_base_patch16_224), got an empty string")
        need(self.num_patches <= MAX_PATCHES,
             f"img_size={self.img_size} / patch_size={self.patch_size} gives L={self.num_patches} patches; "
             f"at most {MAX_PATCHES} (attention holds L x L scores per head and image)")
        need(self.parameter_lower_bound() <= MAX_PARAMETERS,
             f"the model would have more than {self.parameter_lower_bound():.3g} parameters (embed_dim="
             f"{self.embed_dim}, depth={self.depth}, decoder_dim={self.decoder_dim}, codebook_size="
             f"{self.codebook_size} x code_dim={self.code_dim}); at most {MAX_PARAMETERS:.3g}")
        need(self.alpha_rep <= 1, f"alpha_rep must be <= 1 (a replaced patch never outweighs a masked one), "
                                  f"got {self.alpha_rep}")
        self._validate_peer_methods(need)

    # ==========================================================================================
    # MCF-style and FRA-style pre-training (method="mcf" | "fra"; docs/method.md "Peer methods").
    # Both keep a momentum (EMA) branch whose momentum follows teacher_momentum ->
    # teacher_momentum_end like PaCo-FR's teacher; MCF masks each view with mae_mask_ratio;
    # FRA's second view is a known similarity transform bounded by eq_max_rotation / eq_max_scale /
    # eq_max_shift, matched where it covers the first by eq_min_overlap.
    # ==========================================================================================
    peer_hidden_dim: int = 2048  # hidden width of the projector / predictor MLPs of MCF and FRA
    peer_proj_dim: int = 256  # output width of the projectors and predictors
    # --- MCF: L = w_mcf_rec L_rec + w_mcf_feat L_feat + w_mcf_con L_con
    mcf_temperature: float = 0.2  # InfoNCE temperature of the class-token contrast
    # feature-reconstruction target: "ema" = the EMA teacher's patch features of the full image;
    # otherwise the frozen target network: a timm model folder (or pacofr export), a pacofr training
    # run / checkpoint, or "timm:NAME" (timm.create_model(NAME, pretrained=True)); "" = no L_feat
    mcf_target: str = "ema"
    w_mcf_rec: float = 1.0
    w_mcf_feat: float = 1.0
    w_mcf_con: float = 1.0
    # --- FRA: L = w_fra_global L_global + w_fra_local L_local + w_fra_cluster L_cluster
    fra_regions: int = 8  # learned facial regions (mask embeddings); <= 16 keeps soft_assign fused
    fra_region_dim: int = 128  # width of the per-patch projection and of the region embeddings
    fra_tau: float = 0.1  # temperature of the student's region heatmaps (cosine / tau)
    fra_sinkhorn_eps: float = 0.05  # temperature of the teacher scores the balanced targets start from
    fra_sinkhorn_iters: int = 3
    w_fra_global: float = 1.0
    w_fra_local: float = 1.0
    w_fra_cluster: float = 1.0

    def _validate_peer_methods(self, need: Any) -> None:
        """The MCF / FRA flags (called by :meth:`validate`)."""
        for name in ("peer_hidden_dim", "peer_proj_dim", "fra_regions", "fra_region_dim", "fra_sinkhorn_iters"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mcf_temperature", "fra_tau", "fra_sinkhorn_eps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("w_mcf_rec", "w_mcf_feat", "w_mcf_con", "w_fra_global", "w_fra_local", "w_fra_cluster"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.fra_regions >= 2, f"fra_regions must be >= 2 (a partition into regions), got {self.fra_regions}")
        if self.method == "mcf":
            need(self.encoder_mask == "drop", "method='mcf' encodes the visible patches of each masked view: it "
                 f"needs encoder_mask='drop', got {self.encoder_mask!r}")
            need(round(self.mae_mask_ratio * self.num_patches) >= 1,
                 f"method='mcf' needs masked patches: round(mae_mask_ratio * L) = 0 (mae_mask_ratio="
                 f"{self.mae_mask_ratio}, L={self.num_patches})")
