"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learnable prompts + DPAM.

Restated from its public reference code (from zqhang/AnomalyCLIP with its Apr 2025
fixes; written anew for open_clip 3.x, whose blocks are batch-first):

1. the frame is squash-resized (bicubic) to ``input_size`` (518 for ViT-L-14-336); the 24 x 24
   positional embedding is interpolated bilinearly to 37 x 37 (``pos_interpolation``);
2. text, object-agnostic (:class:`ObjectAgnosticPrompts`): ``[SOS] c1..c12 object . [EOS]`` and
   ``[SOS] c'1..c'12 damaged object . [EOS]`` with learnable context vectors initialised
   N(0, 0.02); in text blocks 2..9 the 4 tokens after [SOS] are replaced by learnable 4 x width
   tensors (deep prompts, :func:`encode_learned_text`); t = EOT token -> ln_final -> projection,
   L2-normalised;
3. DPAM (:func:`dpam_forward`) in vision blocks 6..24: each block also runs the v-v attention
   softmax(v v^T / sqrt(d)) v with the frozen block's own in/out projections; at block 6 the
   v-v path starts as ``s = x_5 + VV(ln_1(x_5))``, then ``s += VV_l(ln_1(o_{l-1}))`` with the
   ORIGINAL path's tokens as input and no FFN;
4. patch features = ln_post(s at each segmentation layer) @ proj; global feature = the original
   path's class token @ proj WITHOUT ln_post;
5. map = sum over the segmentation layers of softmax(cos(patch, t) / 0.07)[a], each bilinear
   (align_corners False) to ``input_size``, then Gaussian sigma 4 (``test.py``); image score =
   softmax(cos(global, t) / 0.07)[a]. ``anomaly_map`` is that sum divided by the number of layers
   (to [0, 1]; the same ranking), bilinear to the frame.

``segmentation_layers``: the shipped ``train.sh`` / ``test.sh`` pass ``--features_list 24`` (one
layer, the default here); the scripts' Python default is [6, 12, 18, 24] (four layers summed).
Both run; the run report records which (``model.method_config.segmentation_layers``).

``deep_prompt_fp16`` (default True, the reference's): the reference casts each deep prompt to
float16 where it splices it into the text tower (everything else runs in float32 on CPU and
with its released settings); the forward rounds the prompts, the backward rounds each sentence's
gradient before the sentences are summed.

Training (only the prompts): loss = 4 x sum over the segmentation layers of [focal(2-channel map)
+ dice(p_a, gt) + dice(p_n, 1 - gt)] + CE(global logits / 0.07, image label) (``train.py``;
:meth:`AnomalyClip.loss`).
Reference training: 15 epochs, batch 8, Adam lr 1e-3 betas (0.5, 0.999), seed 111, on the
auxiliary dataset's test split; these live in the optimizer / trainer / data sections.

Dimension symbols: B batch, N = 1 + h * w tokens, C vision width, W text width, D embedding
width, S the model's input side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec
from clipsam.losses import dice_loss, focal_loss
from clipsam.methods._openclip import DTYPES, FrozenClipMixin, build_open_clip, check_vit, pil_input_specs, resize_images, vv_residual
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import gaussian_blur

__all__ = [
    "CONFIG",
    "AnomalyClip",
    "AnomalyClipConfig",
    "ObjectAgnosticPrompts",
    "anomalyclip_loss",
    "build",
    "dpam_forward",
    "dpam_forward_layers",
    "encode_learned_text",
]

_KEY = "model.method_config"


@dataclass
class AnomalyClipConfig:
    """AnomalyCLIP's settings (``model.method_config`` when ``model.method=anomalyclip``).

    Attributes:
        model_name: open_clip architecture (``ViT-L-14-336``; ``clipsam-tiny-240`` for tests).
        pretrained: open_clip tag (``openai``) or local file; ``None``/``""``: random weights.
        cache_dir: open_clip's weight cache.
        quick_gelu: Force QuickGELU (``None`` follows the tag; set ``True`` for a local copy of
            OpenAI weights).
        input_size: Side the frame is squash-resized to (518); ``None`` runs at the frame size.
        pos_interpolation: How the positional embedding reaches ``input_size``: ``"bilinear"``
            (the reference's: build at the native 336, interpolate the 24 x 24 grid bilinearly)
            or ``"open_clip"`` (open_clip's bicubic resize when building for that size).
        n_ctx: Learnable context tokens per prompt (12).
        deep_prompt_depth: Deep prompts go into text blocks 2..depth (9: blocks 2-9); 1 disables.
        deep_prompt_length: Tokens replaced after [SOS] in those blocks (4).
        dpam_start: First vision block (1-based) of the v-v path (6 of 24: DPAM_layer=20).
        segmentation_layers: Vision blocks whose v-v maps are summed (``None``: the last block
            only, as the shipped train.sh / test.sh; ``[6, 12, 18, 24]`` is the scripts' Python
            default).
        segmentation_layer: Deprecated: one block, the same as ``segmentation_layers: [N]``.
        deep_prompt_fp16: Round the deep prompts through float16 where they enter the text
            tower, as the reference does (True).
        object_word: The object-agnostic class word ("object").
        anomalous_state: State of the anomalous prompt, ``{}`` = the word ("damaged {}").
        temperature: T of ``softmax(cos / T)`` for maps, image scores and the CE loss (0.07).
        smoothing_sigma: Gaussian sigma in pixels of the input size (4; 0 disables).
        map_loss_weight: lambda of the segmentation loss (4).
        focal_gamma: Focal-loss gamma (2).
        frozen_dtype: dtype of the frozen open_clip weights.
        seed: Seed of random weights and of the prompt initialisation.
    """

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    quick_gelu: bool | None = None
    input_size: int | None = 518
    pos_interpolation: Literal["bilinear", "open_clip"] = "bilinear"
    n_ctx: int = 12
    deep_prompt_depth: int = 9
    deep_prompt_length: int = 4
    dpam_start: int = 6
    segmentation_layers: list[int] | None = None
    segmentation_layer: int | None = None
    deep_prompt_fp16: bool = True
    object_word: str = "object"
    anomalous_state: str = "damaged {}"
    temperature: float = 0.07
    smoothing_sigma: float = 4.0
    map_loss_weight: float = 4.0
    focal_gamma: float = 2.0
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.segmentation_layer is not None:
            if self.segmentation_layers is not None and list(self.segmentation_layers) != [int(self.segmentation_layer)]:
                raise ConfigError(
                    f"{_KEY}.segmentation_layer={self.segmentation_layer} and segmentation_layers="
                    f"{self.segmentation_layers} disagree: keep segmentation_layers only."
                )
            self.segmentation_layers = [int(self.segmentation_layer)]
            self.segmentation_layer = None
        if self.segmentation_layers is not None:
            self.segmentation_layers = [int(v) for v in self.segmentation_layers]
            if not self.segmentation_layers or any(b <= a for a, b in zip(self.segmentation_layers, self.segmentation_layers[1:])):
                raise ConfigError(f"{_KEY}.segmentation_layers={self.segmentation_layers}: give increasing 1-based blocks, e.g. [24].")
        if self.n_ctx < 1:
            raise ConfigError(f"{_KEY}.n_ctx={self.n_ctx} must be >= 1.")
        if self.deep_prompt_depth < 1 or self.deep_prompt_length < 1:
            raise ConfigError(f"{_KEY}.deep_prompt_depth and deep_prompt_length must be >= 1.")
        if self.deep_prompt_depth > 1 and self.deep_prompt_length > self.n_ctx:
            raise ConfigError(
                f"{_KEY}.deep_prompt_length={self.deep_prompt_length} must be <= n_ctx={self.n_ctx} "
                "(the deep prompts replace context tokens)."
            )
        if self.dpam_start < 1:
            raise ConfigError(f"{_KEY}.dpam_start={self.dpam_start} must be a 1-based block index.")
        if "{}" not in self.anomalous_state:
            raise ConfigError(f"{_KEY}.anomalous_state={self.anomalous_state!r} must contain '{{}}'.")
        if self.temperature <= 0 or self.smoothing_sigma < 0:
            raise ConfigError(f"{_KEY}.temperature must be > 0 and smoothing_sigma >= 0.")
        if self.pos_interpolation not in ("bilinear", "open_clip"):
            raise ConfigError(f"{_KEY}.pos_interpolation={self.pos_interpolation!r}: use 'bilinear' or 'open_clip'.")
        if self.frozen_dtype not in DTYPES:
            raise ConfigError(f"{_KEY}.frozen_dtype={self.frozen_dtype!r}: use one of {list(DTYPES)}.")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"{_KEY}.input_size={self.input_size} must be positive or null.")


CONFIG = AnomalyClipConfig


# ---------------------------------------------------------------------- pure pieces
def dpam_forward(visual: nn.Module, images: Tensor, start: int, segmentation_layer: int) -> tuple[Tensor, Tensor]:
    """The dual path of DPAM through an open_clip ``VisionTransformer``, one segmentation layer.

    Original path: ``o_l = block_l(o_{l-1})`` through all blocks. v-v path from block ``start``:
    ``s = o_{start-1} + VV_start(ln_1(o_{start-1}))``, then ``s += VV_l(ln_1(o_{l-1}))``.

    Args:
        visual: open_clip ``VisionTransformer`` (batch-first, class-token pooled).
        images: (B, 3, S, S) CLIP-normalised, in the tower's dtype.
        start: First DPAM block, 1-based.
        segmentation_layer: Block (1-based, >= start) whose v-v tokens are returned.

    Returns:
        ``(patch_features, global_feature)``: ``ln_post(s) @ proj`` (B, N, D) with the class
        token first, and ``o_L[:, 0] @ proj`` (B, D), no ln_post.
    """
    patches, global_feature = dpam_forward_layers(visual, images, start, [segmentation_layer])
    return patches[0], global_feature


def dpam_forward_layers(visual: nn.Module, images: Tensor, start: int, layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """:func:`dpam_forward` with the v-v tokens of several blocks (``layers``, 1-based, >= start).

    Returns:
        ``([ln_post(s_l) @ proj for l in layers], o_L[:, 0] @ proj)``: (B, N, D) each, and (B, D).
    """
    x = visual._embeds(images)
    s: Tensor | None = None
    taps: dict[int, Tensor] = {}
    last = max(layers)
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if start <= index <= last:
            residual = vv_residual(block, x)
            s = x + residual if s is None else s + residual
            if index in layers:
                taps[index] = s
        x = block(x)
    patches = [visual.ln_post(taps[layer]) @ visual.proj for layer in layers]
    return patches, x[:, 0] @ visual.proj


def encode_learned_text(
    clip_model: nn.Module,
    embeddings: Tensor,
    tokens: Tensor,
    deep_prompts: Sequence[Tensor] = (),
    *,
    deep_prompt_fp16: bool = False,
) -> Tensor:
    """open_clip's text tower on given token embeddings, with deep prompts.

    Before text block ``i + 2`` (1-based; i = 0, 1, ...) the tokens at positions
    ``1 .. len(deep_prompts[i])`` are replaced by ``deep_prompts[i]`` (AnomalyCLIP's compound
    prompts: blocks 2..9 for 8 tensors).

    Args:
        clip_model: open_clip ``CLIP`` (text tower on the model: ``transformer``, ``ln_final`` ...).
        embeddings: (P, context, W) token embeddings (learned ones spliced in), no positions yet.
        tokens: (P, context) int64 token ids (the EOT position is found from them).
        deep_prompts: Up to ``blocks - 1`` tensors (L_d, W).
        deep_prompt_fp16: Splice the deep prompts in as float16 values (the reference's cast): the
            forward rounds them, the backward rounds each sentence's gradient to float16 before
            the sentences' gradients are summed.

    Returns:
        (P, D) text features, not normalised.
    """
    from open_clip.transformer import text_global_pool

    dtype = clip_model.transformer.get_cast_dtype()
    x = embeddings.to(dtype) + clip_model.positional_embedding.to(dtype)
    count = x.shape[0]
    for index, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= index <= len(deep_prompts):
            deep = deep_prompts[index - 1]
            deep = deep.half() if deep_prompt_fp16 else deep.to(dtype)
            spliced = deep.unsqueeze(0).expand(count, -1, -1).to(dtype)  # per-sentence cast back
            x = torch.cat([x[:, :1], spliced, x[:, 1 + deep.shape[0] :]], dim=1)
        x = block(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    pooled = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled @ projection


def anomalyclip_loss(
    probs: Tensor,
    masks: Tensor,
    image_logits: Tensor,
    labels: Tensor,
    *,
    map_weight: float = 4.0,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """``lambda sum_l [focal(probs_l) + dice(p_a, gt) + dice(p_n, 1 - gt)] + CE(image_logits, label)``.

    Args:
        probs: (B, 2, S, S) softmax over (normal, anomalous), or (B, L, 2, S, S) one per
            segmentation layer (the map terms are summed over the layers, ``train.py``).
        masks: (B, S, S) ground truth, > 0.5 anomalous.
        image_logits: (B, 2) global logits already divided by the temperature.
        labels: (B,) image labels, 1 anomalous.
        map_weight: lambda (4).
        focal_gamma: Focal gamma (2).

    Returns:
        ``{"loss", "focal", "dice", "image_ce"}`` 0-d float32 (only ``loss`` carries gradients).
    """
    gt = (masks > 0.5).float()
    layers = probs.unbind(1) if probs.dim() == 5 else (probs,)
    focal = sum(focal_loss(p, gt, gamma=focal_gamma) for p in layers)
    dice = sum(dice_loss(p[:, 1], gt) + dice_loss(p[:, 0], 1.0 - gt) for p in layers)
    image_ce = F.cross_entropy(image_logits.float(), labels.long())
    loss = map_weight * (focal + dice) + image_ce
    return {"loss": loss, "focal": focal.detach(), "dice": dice.detach(), "image_ce": image_ce.detach()}


# ---------------------------------------------------------------------- prompts
class ObjectAgnosticPrompts(nn.Module):
    """The learnable object-agnostic prompts (the only trained parameters).

    Attributes:
        ctx_normal: (n_ctx, W) context of ``c1..c12 object .``.
        ctx_anomalous: (n_ctx, W) context of ``c'1..c'12 damaged object .``.
        deep: ``deep_prompt_depth - 1`` tensors (deep_prompt_length, W) for text blocks 2..depth.
    """

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: AnomalyClipConfig) -> None:
        super().__init__()
        width = int(clip_model.ln_final.weight.shape[0])
        text_blocks = len(clip_model.transformer.resblocks)
        if config.deep_prompt_depth > text_blocks:
            raise ConfigError(
                f"{_KEY}.deep_prompt_depth={config.deep_prompt_depth} exceeds the {text_blocks} text blocks "
                f"of {config.model_name}."
            )
        self.n_ctx = config.n_ctx
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.ctx_normal = nn.Parameter(torch.randn(config.n_ctx, width) * 0.02)
            self.ctx_anomalous = nn.Parameter(torch.randn(config.n_ctx, width) * 0.02)
            self.deep = nn.ParameterList(
                nn.Parameter(torch.randn(config.deep_prompt_length, width) * 0.02)
                for _ in range(config.deep_prompt_depth - 1)
            )
        filler = " ".join(["X"] * config.n_ctx)
        sentences = [
            f"{filler} {config.object_word}.",
            f"{filler} {config.anomalous_state.format(config.object_word)}.",
        ]
        tokens = tokenizer(sentences)  # (2, context)
        if bool((tokens[:, -1] != 0).any()):  # the sentence filled (or was cut to) the whole context
            raise ConfigError(f"{_KEY}.n_ctx={config.n_ctx} makes the prompts longer than the text context.")
        with torch.no_grad():
            embedded = clip_model.token_embedding(tokens).float()  # (2, context, W)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # [SOS]
        self.register_buffer("suffix", embedded[:, 1 + config.n_ctx :].clone(), persistent=False)

    def embeddings(self) -> Tensor:
        """(2, context, W): [SOS] + learned context + the fixed rest, rows (normal, anomalous)."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous]).to(self.prefix.dtype)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


# ---------------------------------------------------------------------- the producer
class AnomalyClip(FrozenClipMixin, MapProducer):
    """AnomalyCLIP map producer (trains only :attr:`prompts`).

    Args:
        clip_model: open_clip ``CLIP`` (class-token ViT) built for ``input_size``.
        tokenizer: Its tokenizer.
        config: The settings.
        input_size: Side the model runs at.
    """

    name = "anomalyclip"
    trainable = True
    onnx_exportable = True
    onnx_text = None  # object-agnostic learned prompts: one text for every category

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: AnomalyClipConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.clip = clip_model
        self.visual = check_vit(clip_model, _KEY, config.model_name)
        self.input_size = int(input_size)
        depth = len(self.visual.transformer.resblocks)
        self.segmentation_layers = list(config.segmentation_layers or [depth])
        if not config.dpam_start <= self.segmentation_layers[0] or self.segmentation_layers[-1] > depth:
            raise ConfigError(
                f"{_KEY}: need dpam_start ({config.dpam_start}) <= segmentation_layers "
                f"{self.segmentation_layers} <= {depth} blocks of {config.model_name}."
            )
        self.grid = self._patch_grid(_KEY)
        self.dtype = DTYPES[config.frozen_dtype]
        self._freeze_clip(self.dtype)
        self.prompts = ObjectAgnosticPrompts(clip_model=clip_model, tokenizer=tokenizer, config=config)

    def object_name(self, category: str) -> str:
        """Object-agnostic: the prompts say ``config.object_word`` whatever the category."""
        return self.config.object_word

    def text_features(self) -> Tensor:
        """(D, 2) float32 unit text features (normal, anomalous); differentiable w.r.t. the prompts."""
        device = self.prompts.ctx_normal.device
        with torch.autocast(device.type, enabled=False):
            feats = encode_learned_text(
                self.clip,
                self.prompts.embeddings(),
                self.prompts.tokens,
                list(self.prompts.deep),
                deep_prompt_fp16=self.config.deep_prompt_fp16,
            )
        return F.normalize(feats.float(), dim=-1).t()

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) CLIP-normalised frame; categories: B names (unused: object-agnostic).

        Returns:
            :class:`MapOutput`: ``anomaly_map`` (B, H, W) in [0, 1], ``image_scores`` (B,);
            extras ``layer_probs`` (B, L, 2, S, S) per segmentation layer (unsmoothed; ``probs`` the
            last one's), ``image_logits`` (B, 2) for :meth:`loss`, and ``raw_map`` (B, S, S), the
            reference's map (the smoothed sum over the L layers).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        height, width = self.output_size(images)
        resized = resize_images(images.float(), self.input_size).to(self.dtype)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            patches, global_feat = dpam_forward_layers(self.visual, resized, self.config.dpam_start, self.segmentation_layers)
        text = self.text_features()  # (D, 2)
        with torch.autocast(images.device.type, enabled=False):
            layer_probs = []
            for patch in patches:
                patch = F.normalize(patch.float()[:, 1:], dim=-1)  # (B, h*w, D)
                probs = (patch @ text / self.config.temperature).softmax(-1)  # (B, h*w, 2)
                probs = probs.transpose(1, 2).reshape(-1, 2, self.grid, self.grid)
                layer_probs.append(F.interpolate(probs, size=(self.input_size,) * 2, mode="bilinear", align_corners=False))
            image_logits = F.normalize(global_feat.float(), dim=-1) @ text / self.config.temperature  # (B, 2)
            raw_map = gaussian_blur(sum(p[:, 1] for p in layer_probs), self.config.smoothing_sigma)  # [0, L]
            anomaly_map = raw_map / len(layer_probs)
            if anomaly_map.shape[-2:] != (height, width):
                anomaly_map = F.interpolate(anomaly_map[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return MapOutput(
            anomaly_map=anomaly_map.clamp(0.0, 1.0),
            image_scores=image_logits.softmax(-1)[:, 1],
            extras={
                "probs": layer_probs[-1],
                "layer_probs": torch.stack(layer_probs, dim=1),
                "image_logits": image_logits,
                "raw_map": raw_map,
            },
        )

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """:func:`anomalyclip_loss` per segmentation layer, at the input size, the map terms summed
        over the layers and the image CE once (``train.py``); needs ``batch["mask"]`` (B, H, W)
        and ``batch["label"]`` (B,)."""
        layer_probs = output.extras["layer_probs"]  # (B, L, 2, S, S)
        masks = batch["mask"].float()
        if masks.shape[-2:] != layer_probs.shape[-2:]:
            masks = F.interpolate(masks[:, None], size=layer_probs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        labels = torch.as_tensor(batch["label"], device=layer_probs.device)
        return anomalyclip_loss(
            layer_probs,
            masks,
            output.extras["image_logits"],
            labels,
            map_weight=self.config.map_loss_weight,
            focal_gamma=self.config.focal_gamma,
        )


def input_specs(config: AnomalyClipConfig, *, image_size: int) -> list[InputSpec]:
    """The reference's input (:func:`clipsam.methods._openclip.pil_input_specs`)."""
    return pil_input_specs(config.input_size, image_size=image_size)


def build(config: AnomalyClipConfig, *, image_size: int) -> AnomalyClip:
    """Build AnomalyCLIP (fresh prompts, seeded) for frames of side ``image_size``."""
    input_size = int(config.input_size or image_size)
    clip_model, tokenizer = build_open_clip(
        section=_KEY,
        model_name=config.model_name,
        pretrained=config.pretrained,
        image_size=input_size,
        cache_dir=config.cache_dir,
        seed=config.seed,
        quick_gelu=config.quick_gelu,
        pos_interpolation=config.pos_interpolation,
    )
    return AnomalyClip(clip_model=clip_model, tokenizer=tokenizer, config=config, input_size=input_size)
