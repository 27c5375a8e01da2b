"""Real architectures of the SAM-side baselines with random weights (SAA+, ClipSAM-rec's UMCI and MMR).

Marked ``slow`` (12.5 minutes on 2 shared CPU cores under heavy load, mostly SAM vit_h and ViT-L): Grounding DINO with the default (grounding-dino-tiny: Swin-T + BERT-base)
architecture, WideResNet-50-2 features for the saliency, UMCI on ViT-L-14-336 at 518, and MMR with
SAM vit_h on a 518 frame.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_grounding_dino_default_architecture_runs_on_an_800_image() -> None:
    from transformers import BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor

    from clipsam.methods.saa import TINY_VOCAB, DetectorConfig, GroundingDinoDetector, _image_processor, filter_boxes

    config = GroundingDinoConfig()  # Swin-T backbone, BERT-base text encoder, 900 queries, 256 text positions
    assert (config.num_queries, config.max_text_len, config.d_model) == (900, 256, 256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(config)
    processor = GroundingDinoProcessor(image_processor=_image_processor(DetectorConfig()), tokenizer=BertTokenizer(str(TINY_VOCAB)))
    detector = GroundingDinoDetector(model=model, processor=processor)
    image = torch.randint(0, 256, (3, 600, 900), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probs, boxes, ids = detector(image, "defect on carpet")
    assert probs.shape == (900, 256) and boxes.shape == (900, 4)
    assert ids[0] == processor.tokenizer.cls_token_id and ids[-1] == processor.tokenizer.sep_token_id
    assert float(probs[:, len(ids):].max()) == 0.0  # padded text positions are masked
    kept, scores, _ = filter_boxes(probs, boxes, ids, box_threshold=0.1, text_threshold=0.1, max_area=1.0)
    assert kept.shape[0] == scores.shape[0]


def test_wide_resnet50_2_saliency_features() -> None:
    from clipsam.methods.saa import SaaConfig, build_saliency_backbone, saliency_features, self_similarity_saliency

    backbone = build_saliency_backbone(SaaConfig(saliency_pretrained=False))
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = saliency_features(backbone, image, 256)
    assert feats.shape == (256 + 512 + 1024, 64, 64)  # layers 1-3 at layer 1's grid
    assert torch.allclose(feats.norm(dim=0), torch.ones(64, 64), atol=1e-4)
    sal = self_similarity_saliency(feats, top_n=400)
    assert sal.shape == (64, 64) and 0.0 <= float(sal.min()) <= float(sal.max()) <= 1.0


def test_umci_on_vit_l_14_336_at_518() -> None:
    from clipsam.methods.umci import UmciConfig, build
    from clipsam.models.clip import ClipConfig

    producer = build(UmciConfig(clip=ClipConfig(pretrained=None)), image_size=518)
    trainable = sum(p.numel() for p in producer.parameters() if p.requires_grad)
    # per layer: V 1024x768+768, two attentions 4 x (768x768+768), 1x1 conv 3*768x768+768
    per_layer = (1024 * 768 + 768) + 2 * 4 * (768 * 768 + 768) + (3 * 768 * 768 + 768)
    assert trainable == 4 * per_layer
    with torch.no_grad():
        out = producer(torch.randn(1, 3, 518, 518), ["metal_nut"])
    assert out.anomaly_map.shape == (1, 518, 518) and out.extras["layer_probs"].shape == (1, 4, 2, 518, 518)


def test_mmr_with_sam_vit_h_on_a_518_frame() -> None:
    from clipsam.refiners.mmr import MmrConfig, MmrRefiner
    from clipsam.models.sam import SamConfig, build_sam

    sam = build_sam(SamConfig(variant="vit_h"), pretrained=False)
    refiner = MmrRefiner(sam=sam, config=MmrConfig())
    image = torch.randn(1, 3, 518, 518)
    amap = torch.zeros(1, 518, 518)
    amap[0, 200:260, 300:340] = 0.9
    amap[0, 50:60, 50:70] = 0.7
    out = refiner.refine_batch({"image": image}, amap)
    assert out.mask.shape == (1, 518, 518) and out.mask_probs.shape == (1, 518, 518)
    assert float(out.mask_probs.max()) > 0.0
