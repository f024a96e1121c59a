import json
import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from polynet.cli import main
from polynet.data import build_dataset
from polynet.evaluation import (
    AdaptiveBatchForward,
    ClassificationMetrics,
    MultiCrop,
    SingleCrop,
    build_report,
    crop_scores,
    default_scales,
    distinct_crops,
    evaluate,
    multi_crop,
    multi_crop_boxes,
    pool_multi_scale,
    pooled_count,
    to_markdown,
    top_k_pool,
    topk_correct,
)
from polynet.evaluation.crops import check_scales
from polynet.io.checkpoint import save_checkpoint

torch.set_num_threads(1)


# --- top-k pooling -----------------------------------------------------------------------------


def test_pooled_count_follows_the_paper():
    assert pooled_count(36, 0.3) == 11  # 30 % of 36 crops
    assert pooled_count(36, 0.25) == 9  # exact fractions stay exact
    assert pooled_count(36, 1.0) == 36
    assert pooled_count(36, 0.001) == 1
    with pytest.raises(ValueError, match="top fraction"):
        pooled_count(36, 0.0)


def test_top_k_pool_averages_the_best_crops_per_class_independently():
    # 10 crops, 2 classes; the best 3 of class 0 are 9, 8, 7, of class 1 are 1, 1, 0.5.
    scores = torch.tensor(
        [[0, 1], [1, 0], [2, 0], [3, 0.5], [4, 0], [5, 0], [6, 1], [7, 0], [8, 0], [9, 0]],
        dtype=torch.float,
    )
    pooled = top_k_pool(scores, 0.3)
    assert torch.allclose(pooled, torch.tensor([8.0, 2.5 / 3]))
    assert torch.allclose(top_k_pool(scores, 1.0), scores.mean(0))
    assert torch.allclose(top_k_pool(scores, 0.01), scores.max(0).values)


def test_pool_multi_scale_pools_within_scales_then_averages():
    # 2 scales x 4 crops x 2 classes, top half (2 crops) per scale.
    scores = torch.tensor(
        [
            [[1, 0], [3, 0], [2, 4], [0, 8]],  # scale 0: class 0 -> (3+2)/2, class 1 -> (8+4)/2
            [[5, 1], [5, 1], [1, 1], [1, 3]],  # scale 1: class 0 -> 5, class 1 -> 2
        ],
        dtype=torch.float,
    )
    assert torch.allclose(pool_multi_scale(scores, 0.5), torch.tensor([3.75, 4.0]))
    batched = torch.stack([scores, scores.flip(-1)])  # leading image dimension
    assert torch.allclose(pool_multi_scale(batched, 0.5)[1], torch.tensor([4.0, 3.75]))


def test_crop_scores():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert torch.allclose(crop_scores(logits).sum(-1), torch.ones(1))
    assert torch.equal(crop_scores(logits, "logits"), logits)
    with pytest.raises(ValueError, match="score must be"):
        crop_scores(logits, "probits")


# --- crop geometry -----------------------------------------------------------------------------

LANDSCAPE_6x10_SIZE_4 = [
    # (square, top, left, height, width) in POSITIONS order: 4 corners, centre, whole
    ("left", 0, 0, 4, 4), ("left", 0, 2, 4, 4), ("left", 2, 0, 4, 4), ("left", 2, 2, 4, 4),
    ("left", 1, 1, 4, 4), ("left", 0, 0, 6, 6),
    ("centre", 0, 2, 4, 4), ("centre", 0, 4, 4, 4), ("centre", 2, 2, 4, 4),
    ("centre", 2, 4, 4, 4), ("centre", 1, 3, 4, 4), ("centre", 0, 2, 6, 6),
    ("right", 0, 4, 4, 4), ("right", 0, 6, 4, 4), ("right", 2, 4, 4, 4), ("right", 2, 6, 4, 4),
    ("right", 1, 5, 4, 4), ("right", 0, 4, 6, 6),
]  # fmt: skip


def _box_tuples(boxes):
    return [(b.square, b.top, b.left, b.height, b.width) for b in boxes]


def test_crop_boxes_of_a_landscape_image_are_exact():
    boxes = multi_crop_boxes(6, 10, 4)
    assert len(boxes) == 36
    assert _box_tuples(boxes[:18]) == LANDSCAPE_6x10_SIZE_4
    assert _box_tuples(boxes[18:]) == LANDSCAPE_6x10_SIZE_4
    assert [b.mirrored for b in boxes] == [False] * 18 + [True] * 18
    assert [b.position for b in boxes[:6]] == [
        "top-left", "top-right", "bottom-left", "bottom-right", "centre", "whole"
    ]  # fmt: skip


def test_crop_boxes_of_a_portrait_image_move_down_the_long_side():
    boxes = multi_crop_boxes(10, 6, 4)[:18]
    assert _box_tuples(boxes) == [
        ("top", 0, 0, 4, 4), ("top", 0, 2, 4, 4), ("top", 2, 0, 4, 4), ("top", 2, 2, 4, 4),
        ("top", 1, 1, 4, 4), ("top", 0, 0, 6, 6),
        ("centre", 2, 0, 4, 4), ("centre", 2, 2, 4, 4), ("centre", 4, 0, 4, 4),
        ("centre", 4, 2, 4, 4), ("centre", 3, 1, 4, 4), ("centre", 2, 0, 6, 6),
        ("bottom", 4, 0, 4, 4), ("bottom", 4, 2, 4, 4), ("bottom", 6, 0, 4, 4),
        ("bottom", 6, 2, 4, 4), ("bottom", 5, 1, 4, 4), ("bottom", 4, 0, 6, 6),
    ]  # fmt: skip


def test_square_images_repeat_their_squares_and_crops_are_evaluated_once():
    boxes = multi_crop_boxes(8, 8, 4)
    keep, inverse = distinct_crops(boxes)
    assert len(keep) == 12  # 6 crops x mirror; the three squares coincide
    assert len(inverse) == 36 and sorted(set(inverse)) == list(range(12))
    for i, box in enumerate(boxes):
        twin = boxes[keep[inverse[i]]]
        assert (twin.top, twin.left, twin.height, twin.width, twin.mirrored) == (
            box.top, box.left, box.height, box.width, box.mirrored
        )  # fmt: skip
    # At scale == input size every crop of a square is the whole square.
    assert len(distinct_crops(multi_crop_boxes(4, 6, 4))[0]) == 6


def test_multi_crop_cuts_the_boxes_and_mirrors_them():
    image = torch.arange(2 * 6 * 10, dtype=torch.float).view(2, 6, 10)
    crops = multi_crop(image, 4)
    assert crops.shape == (36, 2, 4, 4)
    boxes = multi_crop_boxes(6, 10, 4)
    for crop, box in zip(crops[:18], boxes[:18], strict=True):
        region = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
        if box.position == "whole":
            region = TF.resize(region, [4, 4], antialias=True)
        assert torch.allclose(crop, region)
    assert torch.equal(crops[18:], crops[:18].flip(-1))
    assert torch.equal(crops[0, 0, 0], torch.tensor([0.0, 1, 2, 3]))
    assert torch.equal(crops[18, 0, 0], torch.tensor([3.0, 2, 1, 0]))


def test_multi_crop_rejects_images_smaller_than_the_input():
    with pytest.raises(ValueError, match="shorter side"):
        multi_crop_boxes(3, 10, 4)


def test_default_scales_are_relative_to_the_input_size():
    assert default_scales(28) == (32, 34, 36, 38, 40, 42, 44, 46)
    assert set(default_scales(224)) >= {256, 288, 320, 352}  # GoogLeNet's four scales
    assert default_scales(331)[0] == 378  # the released single-crop resize
    assert len(default_scales(331)) == 8
    with pytest.raises(ValueError, match="smaller than"):
        check_scales((24, 32), 28)
    with pytest.raises(ValueError, match="repeat"):
        check_scales((32, 32), 28)


# --- metrics -----------------------------------------------------------------------------------


def test_top1_top5_on_hand_made_logits():
    # Six classes; the target's rank (1 = best) is 1, 3, 6, 5 and 2.
    logits = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5],  # target 0, rank 1
            [9, 8, 7, 6, 5, 4],  # target 2, rank 3
            [0, 1, 2, 3, 4, 5],  # target 0, rank 6
            [5, 4, 3, 2, 1, 0],  # target 4, rank 5
            [1, 2, 0, 0, 0, 0],  # target 0, rank 2
        ],
        dtype=torch.float,
    )
    targets = torch.tensor([0, 2, 0, 4, 0])
    assert topk_correct(logits, targets, (1, 2, 5, 6)) == [1, 2, 4, 5]
    metrics = ClassificationMetrics(6)
    metrics.update(logits[:2], targets[:2])  # accumulates over batches
    metrics.update(logits[2:], targets[2:])
    summary = metrics.summary()
    assert summary["images"] == 5
    assert summary["top1_accuracy"] == pytest.approx(20.0)
    assert summary["top5_accuracy"] == pytest.approx(80.0)
    assert summary["top1_error"] == pytest.approx(80.0)
    assert summary["top5_error"] == pytest.approx(20.0)
    # True class 0 was predicted as 0, 5 and 1; class 2 as 0; class 4 as 0.
    assert metrics.confusion[0].tolist() == [1, 1, 0, 0, 0, 1]
    assert metrics.confusion[:, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert metrics.per_class_accuracy() == [pytest.approx(1 / 3), None, 0.0, None, 0.0, None]


def test_metrics_reject_a_class_count_mismatch():
    with pytest.raises(ValueError, match="10 classes but the data set has 3"):
        ClassificationMetrics(3).update(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))


# --- end to end on generated images whose answer is known ---------------------------------------

COLOURS = {"0_red": (200, 30, 30), "1_green": (30, 200, 30), "2_blue": (30, 30, 200)}
SIZES = [(40, 30), (30, 52), (24, 24)]  # landscape, portrait, square (width, height)


class ColourNet(nn.Module):
    """Predicts the dominant channel: class c's logit is 10 x the mean of channel c."""

    pretrained_cfg = dict(
        input_size=(3, 16, 16), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return self.scale * x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    generator = torch.Generator().manual_seed(0)
    for name, rgb in COLOURS.items():
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            noise = torch.randint(-20, 21, (h, w, 3), generator=generator)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            suffix = "jpg" if i == 0 else "png"
            Image.fromarray(pixels).save(folder / f"{i}.{suffix}")
    (root / "val" / "2_blue" / "broken.png").write_bytes(b"this is not a png")
    return root


def test_single_and_multi_crop_get_the_known_answers_and_skip_unreadable(colour_folder):
    dataset = build_dataset(str(colour_folder), "val")
    for protocol in (SingleCrop(), MultiCrop(scales=(16, 20))):
        result = evaluate(ColourNet(), dataset, protocol, batch_size=50, progress=False)
        assert result.metrics.count == 9
        assert result.metrics.summary()["top1_accuracy"] == 100.0
        assert result.metrics.confusion.diag().tolist() == [3, 3, 3]
        assert [Path(p).name for p, _ in result.unreadable] == ["broken.png"]
    assert result.protocol["crops_per_image"] == 72
    assert result.protocol["pooled_crops_per_scale"] == 11


def test_multi_crop_evaluates_each_distinct_crop_once_in_bounded_batches(colour_folder):
    dataset = build_dataset(str(colour_folder), "val")
    model = ColourNet()
    result = evaluate(model, dataset, MultiCrop(scales=(18, 20)), batch_size=40, progress=False)
    assert result.metrics.count == 9
    # Per class: landscape and portrait images have 36 distinct crops per scale, the square
    # one 12; two scales.
    assert sum(model.batch_sizes) == 3 * 2 * (36 + 36 + 12)
    assert max(model.batch_sizes) <= 40


def test_multi_crop_pooling_matches_a_direct_computation():
    # One image, one scale; the model's score for a crop is its mean brightness per channel.
    image = torch.rand(3, 20, 26, generator=torch.Generator().manual_seed(1))
    pil = TF.to_pil_image(image)

    class OneImage(torch.utils.data.Dataset):
        classes = ["r", "g", "b"]

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return pil, 0

    model = ColourNet()
    seen = []
    model.register_forward_hook(lambda m, inputs, out: seen.append(out.detach()))
    protocol = MultiCrop(scales=(20,), top_fraction=0.25, score="logits")
    evaluate(model, OneImage(), protocol, batch_size=100, progress=False)
    logits = torch.cat(seen)
    assert logits.shape == (36, 3)
    scaled = TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True)
    expected = 10 * multi_crop(scaled, 16).mean(dim=(2, 3))
    assert torch.allclose(logits, expected, atol=1e-5)
    pooled = expected.topk(9, dim=0).values.mean(0)
    assert torch.allclose(pool_multi_scale(logits[None], 0.25), pooled)


# --- CUDA out-of-memory back-off (the error is injected, so this runs on CPU) -------------------


class OutOfMemoryAbove(nn.Module):
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return x.flatten(1)[:, :3] * 2


def test_out_of_memory_batches_are_retried_smaller():
    forward = AdaptiveBatchForward(OutOfMemoryAbove(3), batch_size=8)
    x = torch.randn(10, 1, 2, 2)
    with pytest.warns(RuntimeWarning) as caught:
        out = forward(x)
    assert [str(w.message)[-16:] for w in caught] == [" retrying with 4", " retrying with 2"]
    assert torch.allclose(out, x.flatten(1)[:, :3] * 2)
    assert forward.batch_size == 2  # 8 -> 4 -> 2, and it stays there


def test_other_errors_and_oom_at_batch_one_are_raised():
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(RuntimeWarning):
        AdaptiveBatchForward(OutOfMemoryAbove(0), batch_size=4)(torch.randn(2, 3))

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        AdaptiveBatchForward(Broken(), batch_size=4)(torch.randn(2, 3))


# --- reports and the command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    from polynet import create_model

    model = create_model("polynet_small")
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, dict(model_name="polynet_small", model_kwargs={},
                               model=model.state_dict()))  # fmt: skip
    return path


def test_report_names_model_weights_data_and_protocol(colour_folder):
    dataset = build_dataset(str(colour_folder), "val")
    result = evaluate(ColourNet(), dataset, MultiCrop(scales=(16,)), progress=False)
    report = build_report(
        result,
        model=dict(name="colournet"),
        weights=dict(path="none"),
        data=dict(source=str(colour_folder), split="val"),
    )
    assert report["data"]["images_evaluated"] == 9
    assert report["data"]["images_unreadable"] == 1
    assert report["data"]["unreadable"][0]["path"].endswith("broken.png")
    assert report["protocol"]["scales"] == [16]
    assert report["metrics"]["per_class_accuracy"] == {"0_red": 100.0, "1_green": 100.0,
                                                       "2_blue": 100.0}  # fmt: skip
    json.dumps(report, allow_nan=False)
    text = to_markdown(report)
    assert "# Evaluation of colournet" in text
    assert "1 unreadable" in text and "broken.png" in text
    assert "multi-crop, 36 crops x 1 scales (16)" in text


def test_cli_single_and_multi_crop_on_fashion_mnist(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "single"
    args = ["eval", "--checkpoint", str(small_checkpoint), "--data", "fashion-mnist"]
    code = main([*args, "--limit", "20", "--workers", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["name"] == "polynet_small"
    assert report["data"]["split"] == "test" and report["data"]["images_evaluated"] == 20
    assert report["protocol"]["name"] == "single-crop"
    assert len(report["confusion_matrix"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 20
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1" in (out / "report.md").read_text()
    assert "polynet_small on fashion-mnist test (single-crop): top-1" in capsys.readouterr().out

    json_path = tmp_path / "multi.json"
    code = main([*args, "--limit", "2", "--workers", "0", "--no-progress", "--multi-crop",
                 "--scales", "28", "32", "--json", str(json_path)])  # fmt: skip
    assert code == 0
    report = json.loads(json_path.read_text())
    assert report["protocol"]["scales"] == [28, 32]
    assert report["protocol"]["score"] == "softmax"
    assert report["data"]["images_evaluated"] == 2


def test_cli_reports_bad_arguments_in_one_line(small_checkpoint, capsys):
    args = ["eval", "--checkpoint", str(small_checkpoint), "--data", "fashion-mnist"]
    assert main([*args, "--scales", "30"]) == 2
    assert "need --multi-crop" in capsys.readouterr().err
    assert main([*args, "--multi-crop", "--scales", "20"]) == 2
    assert "smaller than the model's 28 px input" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "missing.pt", "--data", "fashion-mnist"]) == 2
    assert "missing.pt" in capsys.readouterr().err


# --- distributed: two gloo processes, every image counted once ---------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _eval_rank(rank, runs):
    # What torchrun sets; the CLI joins the gloo group from these and leaves it afterwards.
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    for port, argv in runs:
        os.environ["MASTER_PORT"] = str(port)
        assert main(argv) == 0


def test_distributed_evaluation_counts_every_image_once(colour_folder, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "colour.pt"
    from polynet import create_model

    model = create_model("polynet_small", num_classes=3)
    save_checkpoint(checkpoint, dict(model_name="polynet_small", model_kwargs={"num_classes": 3},
                                     model=model.state_dict()))  # fmt: skip
    common = ["eval", "--checkpoint", str(checkpoint), "--data", str(colour_folder),
              "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    full_run = [*common, "--json", str(tmp_path / "full.json")]
    seven_run = [*common, "--limit", "7", "--json", str(tmp_path / "seven.json")]
    runs = [(_free_port(), full_run), (_free_port(), seven_run)]
    # Forked, so the ranks start without importing torch again.
    torch.multiprocessing.start_processes(_eval_rank, args=(runs,), nprocs=2, start_method="fork")
    full, seven = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "seven"))
    assert main([*common, "--json", str(tmp_path / "alone.json")]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert full["runtime"]["processes"] == 2 and alone["runtime"]["processes"] == 1
    assert full["data"]["images_evaluated"] == 9
    assert full["data"]["images_unreadable"] == 1  # found by one rank, reported once
    assert full["confusion_matrix"] == alone["confusion_matrix"]
    assert full["metrics"] == alone["metrics"]
    # 7 images on 2 ranks are 4 + 3: a padding sampler would count 8.
    assert seven["data"]["images_evaluated"] == 7
    assert seven["data"]["images_unreadable"] == 0


def test_a_polynet_is_evaluated_through_its_fused_copy_with_the_same_answers(colour_folder):
    from polynet import create_model

    torch.manual_seed(0)
    model = create_model("polynet_small", in_chans=3, num_classes=3)
    model.pretrained_cfg = dict(ColourNet.pretrained_cfg, input_size=(3, 28, 28))
    for m in model.modules():  # statistics that make folding matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
    dataset = build_dataset(str(colour_folder), "val")
    calls = []
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    norm.register_forward_hook(lambda *_: calls.append(1))  # folded away in the fused copy
    fused = evaluate(model, dataset, SingleCrop(), batch_size=4, progress=False)
    assert not calls
    plain = evaluate(model, dataset, SingleCrop(), batch_size=4, progress=False, fuse=False)
    assert calls
    assert fused.metrics.summary() == plain.metrics.summary()
