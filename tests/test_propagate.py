"""propagate.py end to end on short real clips (CPU, downscaled frames), its bad-input errors and its streaming."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import model
import propagate
from propagate import PropagationConfig, load_encoder, main, propagate_masks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SIZE = (161, 91)  # (W, H): odd, and not multiples of 4, so padding and even overlay sizes are exercised


def copy_clip(shared_data: Path, seq: str, n: int, dst: Path, size=SIZE) -> Path:
    """The first n frames of a DAVIS sequence, resized, as a folder of JPEGs."""
    dst.mkdir(parents=True)
    for i in range(n):
        img = Image.open(shared_data / "davis" / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg")
        (img.resize(size, Image.BILINEAR) if size else img).save(dst / f"{i:05d}.jpg", quality=95)
    return dst


def annotation(shared_data: Path, seq: str, i: int, size=SIZE) -> Image.Image:
    img = Image.open(shared_data / "davis" / "Annotations" / "480p" / seq / f"{i:05d}.png")
    return img.resize(size, Image.NEAREST) if size else img


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised CorrFlow encoder saved in the format model.load_checkpoint reads."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    torch.save({"format": model.CHECKPOINT_FORMAT, "model": model.CorrFlow().state_dict(),
                "model_config": dataclasses.asdict(model.ModelConfig()), "centroids": torch.zeros(16, 2)}, path)
    return path


@pytest.fixture
def clip(shared_data, tmp_path):
    """4 frames of blackswan at 161x91 and their first annotation (palette PNG)."""
    frames = copy_clip(shared_data, "blackswan", 4, tmp_path / "blackswan")
    mask = tmp_path / "first.png"
    annotation(shared_data, "blackswan", 0).save(mask)
    return frames, mask


def read_png(img) -> np.ndarray:
    """Palette indices (or grey levels) of a PNG path or an open image."""
    return np.array(img if isinstance(img, Image.Image) else Image.open(img))


def blackswan_frames(shared_data: Path, n: int, tmp_path: Path, size=(427, 240)) -> tuple[list, np.ndarray]:
    """The first n frames of blackswan, resized and saved as JPEGs, as RGB arrays; and the first mask."""
    frames = copy_clip(shared_data, "blackswan", n, tmp_path / "blackswan", size=size)
    first = read_png(annotation(shared_data, "blackswan", 0, size))
    return [np.array(Image.open(p)) for p in sorted(frames.glob("*.jpg"))], first


def test_end_to_end_random_model(clip, checkpoint, tmp_path):
    frames, mask = clip
    out = main(frames, mask, tmp_path / "out", PropagationConfig(), checkpoint, "cpu")
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(4)]
    for name in names:
        img = Image.open(out / name)
        assert img.mode == "P" and img.size == SIZE
        assert img.getpalette()[:6] == Image.open(mask).getpalette()[:6]
    np.testing.assert_array_equal(read_png(out / "00000.png"), read_png(mask))
    video = iio.imread(out / "overlay.mp4", plugin="pyav")
    assert video.shape == (4, 90, 160, 3)  # cropped to even sizes


def test_two_objects_with_sparse_grey_ids(shared_data, tmp_path):
    frames = copy_clip(shared_data, "blackswan", 4, tmp_path / "blackswan")
    swan = read_png(annotation(shared_data, "blackswan", 0)) > 0
    ids = np.zeros(swan.shape, np.uint8)
    cx = int(np.nonzero(swan)[1].mean())
    ids[:, :cx][swan[:, :cx]] = 3
    ids[:, cx:][swan[:, cx:]] = 7
    mask = tmp_path / "two.png"
    Image.fromarray(ids).save(mask)  # grey-level ids, no palette
    out = main(frames, mask, tmp_path / "out", PropagationConfig(features="lab"), None, "cpu", overlay=False)
    last = Image.open(out / "00003.png")
    assert set(np.unique(np.array(last))) == {0, 3, 7}
    assert last.getpalette()[:9] == propagate.davis_palette()[:9]
    assert not (out / "overlay.mp4").exists()


def test_binary_mask_is_object_one(clip, tmp_path):
    frames, mask = clip
    binary = tmp_path / "binary.png"
    Image.fromarray((read_png(mask) > 0).astype(np.uint8) * 255).save(binary)
    ids, palette = propagate.read_mask(binary)
    assert palette is None and set(np.unique(ids)) == {0, 1}


def test_corrflow_protocol(clip, checkpoint, tmp_path, monkeypatch):
    parser = propagate.argparse.ArgumentParser()
    propagate.add_propagation_args(parser)
    cfg = propagate.config_from_args(parser.parse_args(["--protocol", "corrflow"]))
    assert (cfg.use_first, cfg.num_recent, cfg.soft_labels, cfg.radius, cfg.temperature) == (False, 1, False, 6, None)
    assert propagate.config_from_args(parser.parse_args(["--protocol", "corrflow", "--radius", "3"])).radius == 3
    cfg_default = propagate.config_from_args(parser.parse_args(["--features", "lab", "--no-first", "--hard-labels"]))
    assert (cfg_default.features, cfg_default.use_first, cfg_default.soft_labels) == ("lab", False, False)
    seen = []

    def spy(query, refs, values, radius, temperature, topk):
        seen.append((refs.shape[1], values, temperature))
        return propagate.local_attention_orig(query, refs, values, radius, temperature, topk)

    monkeypatch.setattr(propagate, "local_attention_orig", propagate.local_attention, raising=False)
    monkeypatch.setattr(propagate, "local_attention", spy)
    frames, mask = clip
    main(frames, mask, tmp_path / "out", cfg, checkpoint, "cpu", overlay=False)
    assert [r for r, _, _ in seen] == [1, 1, 1] and all(t == 1.0 for _, _, t in seen)
    for _, values, _ in seen[1:]:  # fed-back labels are one-hot: hard argmax
        assert set(values.unique().tolist()) <= {0.0, 1.0} and torch.all(values.sum(2) == 1)


def test_points_on_dog(shared_data, tmp_path):
    gt = json.loads((shared_data / "keypoints" / "dog.json").read_text())
    start = gt["frames"][0]
    frames = copy_clip(shared_data, "dog", start + 3, tmp_path / "dog", size=None)
    out = main(frames, shared_data / "keypoints" / "dog.json", tmp_path / "out", PropagationConfig(features="lab"),
               None, "cpu")
    doc = json.loads((out / "points.json").read_text())
    assert doc["sequence"] == "dog" and doc["frame_size"] == [854, 480]
    assert doc["frames"] == [start, start + 1, start + 2]
    visible = gt["visible"][0]
    for xy in doc["xy"]:
        assert len(xy) == len(visible)
        assert [p is None for p in xy] == [not v for v in visible]
    first = np.array([p for p in doc["xy"][0] if p is not None])
    np.testing.assert_allclose(first, np.array(gt["xy"][0])[visible], atol=0.01)
    moved = np.array([p for p in doc["xy"][-1] if p is not None])
    assert np.median(np.linalg.norm(moved - first, axis=1)) < 40  # dog frames 3 -> 5: points stay near the dog
    assert iio.imread(out / "overlay.mp4", plugin="pyav").shape[0] == 3


def test_lab_baseline_keeps_the_object(shared_data, tmp_path):
    rgb, first = blackswan_frames(shared_data, 4, tmp_path)
    encoder = load_encoder(None, "lab", CPU)
    cfg = PropagationConfig(features="lab", num_recent=1)
    pred = list(propagate_masks(rgb, first, cfg, encoder, CPU))[3] > 0
    gt = read_png(annotation(shared_data, "blackswan", 3, (427, 240))) > 0
    assert (pred & gt).sum() / (pred | gt).sum() > 0.5


def test_scale_encodes_smaller_and_writes_full_size(shared_data, tmp_path):
    rgb, first = blackswan_frames(shared_data, 3, tmp_path)
    encoder = load_encoder(None, "lab", CPU)
    seen = []
    real = encoder[0].embed
    encoder[0].embed = lambda x: seen.append(tuple(x.shape[-2:])) or real(x)
    full, half = (list(propagate_masks(rgb, first, PropagationConfig(features="lab", scale=s), encoder, CPU))
                  for s in (1.0, 0.5))
    assert seen[0] == (240, 428) and seen[-1] == (120, 216)  # 213.5 -> 214, padded to 216
    gt = read_png(annotation(shared_data, "blackswan", 2, (427, 240))) > 0
    for pred in (full[2], half[2]):
        assert pred.shape == (240, 427) and ((pred > 0) & gt).sum() / ((pred > 0) | gt).sum() > 0.6
    # points: encoded at half size, written in the frame's pixels
    points = np.array([[200.0, 120.0], [250.0, 100.0]])
    tracks = list(propagate.propagate_points(rgb, points, PropagationConfig(features="lab", scale=0.5), encoder, CPU))
    np.testing.assert_allclose(tracks[0], points)
    assert np.abs(tracks[1] - points).max() < 30


def test_streaming_keeps_at_most_n_plus_one_references(clip, monkeypatch):
    frames_dir, mask = clip
    rgb = [np.array(Image.open(p)) for p in sorted(frames_dir.glob("*.jpg"))] * 2  # 8 frames
    consumed, refs_seen = [], []

    def source():
        for i, frame in enumerate(rgb):
            consumed.append(i)
            yield frame

    def spy(query, refs, values, radius, temperature, topk):
        refs_seen.append(refs.shape[1])
        return orig(query, refs, values, radius, temperature, topk)

    orig = propagate.local_attention
    monkeypatch.setattr(propagate, "local_attention", spy)
    cfg = PropagationConfig(features="lab", num_recent=2)
    gen = propagate_masks(source(), read_png(mask), cfg, load_encoder(None, "lab", CPU), CPU)
    for n, labels in enumerate(gen, 1):
        assert labels.shape == (SIZE[1], SIZE[0]) and labels.dtype == np.uint8
        assert len(consumed) <= n + 1  # reads one frame ahead, no more
    assert n == 8 and refs_seen == [1, 2, 3, 3, 3, 3, 3]



def test_ahead_computes_the_next_item_in_a_worker_while_the_caller_holds_this_one():
    import threading
    taken, threads, took = [], set(), threading.Semaphore(0)

    def items():
        for i in range(4):
            taken.append(i)
            took.release()
            if i == 3:
                raise ValueError("item 3 is unreadable")
            yield i

    def square(i):
        threads.add(threading.get_ident())
        return i * i

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for result in propagate.ahead(square, items()):
            got.append(result)
            for _ in range(2 if len(got) == 1 else 1):  # the next item is taken while the caller holds this one
                assert took.acquire(timeout=60)
            assert len(taken) == len(got) + 1
    assert got == [0, 1, 4]  # every result before the error, in order
    assert threads and threading.get_ident() not in threads


def test_missing_default_checkpoint_says_how_to_go_on(monkeypatch, tmp_path):
    monkeypatch.setattr(model, "DEFAULT_CHECKPOINT", tmp_path / "checkpoints" / "corrflow.pt")
    with pytest.raises(ValueError, match="--checkpoint PATH or use --features lab"):
        load_encoder(None, "model", CPU)


def bad_inputs(clip, checkpoint, tmp_path):
    """(name, main's arguments) of inputs that must fail with one clear line."""
    frames, mask = clip
    small = tmp_path / "small.png"
    Image.fromarray(read_png(mask)[:40, :40]).save(small)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.uint8)).save(empty)
    one = tmp_path / "one"
    one.mkdir()
    (one / "00000.jpg").write_bytes((frames / "00000.jpg").read_bytes())
    corrupt_video = tmp_path / "corrupt.mp4"
    corrupt_video.write_bytes(b"\x00not a video" * 100)
    corrupt_mask = tmp_path / "corrupt.png"
    corrupt_mask.write_bytes(b"not a png")
    done = tmp_path / "done"
    done.mkdir()
    (done / "00000.png").write_bytes(b"")
    wrong_ckpt = tmp_path / "wrong.pt"
    torch.save({"weights": 1}, wrong_ckpt)
    bad_json = tmp_path / "points.json"
    bad_json.write_text('{"frames": [0], "xy": []}')
    cpu = PropagationConfig(features="lab")
    return {
        "missing video": (tmp_path / "nope.mp4", mask, None, cpu, None),
        "corrupt video": (corrupt_video, mask, None, cpu, None),
        "mask size": (frames, small, None, cpu, None),
        "no object": (frames, empty, None, cpu, None),
        "one frame": (one, mask, None, cpu, None),
        "results exist": (frames, mask, done, cpu, None),
        "wrong checkpoint": (frames, mask, None, PropagationConfig(), wrong_ckpt),
        "unreadable mask": (frames, corrupt_mask, None, cpu, None),
        "missing mask": (frames, tmp_path / "nope.png", None, cpu, None),
        "bad points json": (frames, bad_json, None, cpu, None),
    }


def test_bad_inputs_raise_one_line(clip, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders land here
    for name, (video, labels, out, cfg, ckpt) in bad_inputs(clip, checkpoint, tmp_path).items():
        with pytest.raises(ValueError) as err:
            main(video, labels, out, cfg, ckpt, "cpu", overlay=False)
        assert str(err.value) and "\n" not in str(err.value), name


def test_cli_error_is_one_line_on_stderr(clip, tmp_path):
    frames, _ = clip
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.uint8)).save(empty)
    run = subprocess.run([sys.executable, str(ROOT / "propagate.py"), str(frames), str(empty), "--features", "lab"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"error: {empty}: the first-frame mask has no object (every pixel is "
                                               "background 0)"]


def test_overwrite_replaces_results(clip, tmp_path):
    frames, mask = clip
    cfg = PropagationConfig(features="lab")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00099.png").write_bytes(b"")  # a stale result from a longer video
    main(frames, mask, out, cfg, None, "cpu", overlay=False, overwrite=True)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]


def test_end_to_end_with_weights_written_by_train(shared_data, clip, tmp_path):
    """The weights train.py exports at the end of a run are what propagate.py reads."""
    import train

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").symlink_to(sorted((shared_data / "train_videos_256").glob("davis16-*.mp4"))[0])
    centroids = tmp_path / "centroids.pt"
    torch.save(torch.randn(16, 2) * 30, centroids)
    weights = train.main(train.TrainConfig(data=str(videos), out=str(tmp_path / "run"), steps=1, batch_size=1,
                                           size=32, workers=0, device="cpu", centroids=str(centroids)))
    frames, mask = clip
    out = tmp_path / "out"
    main(frames, mask, out, PropagationConfig(), weights, "cpu", overlay=False)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]


def test_full_disk_is_one_line_and_leaves_no_temporary_file(clip, tmp_path, full_disk, capsys):
    """The third mask does not fit: the command says which file and why, and the half-written overlay video and
    mask are removed (the masks before it are kept: they are complete)."""
    frames, mask = clip
    full_disk(room=50, when=lambda path: path.name.startswith(".00002."))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        propagate.cli([str(frames), str(mask), "--out", str(out), "--features", "lab"])
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: cannot write {out / '00002.png'}: No space left on device "
                                    f"(2 of 4 frames written to {out})")
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]
    # points: the same for points.json
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"sequence": "blackswan", "frame_size": list(SIZE), "frames": [0],
                                  "xy": [[[80, 40]]], "visible": [[True]]}))
    full_disk(room=10, when=lambda path: path.name.startswith(".points."))
    with pytest.raises(SystemExit):
        propagate.cli([str(frames), str(points), "--out", str(tmp_path / "pts"), "--features", "lab"])
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: cannot write {tmp_path / 'pts' / 'points.json'}: "
                                                         "No space left on device")
    assert sorted(p.name for p in (tmp_path / "pts").iterdir()) == ["overlay.mp4"]  # complete before the points


def test_summed_logits_of_model_and_lab():
    """--features model+lab: one softmax over <q, k> / T (normalised model features) + -|q - k|^2 / T_lab (Lab),
    here checked by hand on a 2x2-cell frame whose only reference is the first frame (radius covers all of it)."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(5, 3, generator=g)
    model_part = model.Encoder(lambda rgb: torch.einsum("dc,bchw->bdhw", proj, F_avg(rgb)), squared_distance=False)
    lab_part = model.Encoder(model.lab_features, squared_distance=True)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    labels = torch.rand(1, 3, 2, 2, generator=g)
    cfg = PropagationConfig(features="model+lab", radius=2, num_recent=0, normalize=True, temperature=0.3,
                            lab_temperature=0.01)
    probs = list(propagate._propagate(frames[0], iter(frames[1:]), labels, cfg, [model_part, lab_part], CPU))[1]

    rgb = [propagate.to_tensor(f, CPU) for f in frames]
    m = [torch.nn.functional.normalize(model_part.embed(x), dim=1).flatten(2)[0] for x in rgb]  # (5, 4) each
    lab = [model.lab_features(x).flatten(2)[0] for x in rgb]  # (3, 4) each
    logits = m[1].T @ m[0] / 0.3 - ((lab[1].T[:, None] - lab[0].T[None]) ** 2).sum(-1) / 0.01  # (query, key)
    expected = (torch.softmax(logits, 1) @ labels.flatten(2)[0].T).T.reshape(1, 3, 2, 2)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def F_avg(rgb):
    return torch.nn.functional.avg_pool2d(rgb, model.STRIDE)


def test_first_radius_topk_and_features_reach_the_op(clip, checkpoint, monkeypatch):
    frames_dir, mask = clip
    seen = []

    def spy(query, refs, values, radius, temperature, topk):
        seen.append((refs.shape[2], list(radius), temperature, topk))
        return orig(query, refs, values, radius, temperature, topk)

    orig = propagate.local_attention
    monkeypatch.setattr(propagate, "local_attention", spy)
    cfg = PropagationConfig(features="model+lab", radius=6, first_radius=9, topk=7, num_recent=2, normalize=True)
    rgb = [np.array(Image.open(p)) for p in sorted(frames_dir.glob("*.jpg"))]
    list(propagate_masks(rgb, read_png(mask), cfg, load_encoder(checkpoint, "model+lab", CPU), CPU))
    assert seen == [(64 + 4, [9], 1.0, 7), (68, [9, 6], 1.0, 7), (68, [9, 6, 6], 1.0, 7)]


def test_temperature_of_lab_is_its_own_flag():
    parser = propagate.argparse.ArgumentParser()
    propagate.add_propagation_args(parser)
    with pytest.raises(ValueError, match="--lab-temperature"):
        propagate.config_from_args(parser.parse_args(["--features", "lab", "--temperature", "0.1"]))
    cfg = propagate.config_from_args(parser.parse_args(["--features", "model+lab", "--lab-temperature", "0.002",
                                                        "--topk", "10", "--first-radius", "12", "--normalize"]))
    assert (cfg.lab_temperature, cfg.topk, cfg.first_radius, cfg.normalize) == (0.002, 10, 12, True)
    assert propagate.config_from_args(parser.parse_args(["--precision", "fp16"])).precision == "fp16"
    with pytest.raises(ValueError, match="lab_temperature"):
        propagate.temperatures(PropagationConfig(features="lab", temperature=0.1), load_encoder(None, "lab", CPU))


def test_fp16_references_are_rounded_and_change_little(shared_data, tmp_path, monkeypatch):
    """--precision fp16 (what a GPU runs): queries, keys and labels are rounded to fp16 (on the CPU the op then
    computes in fp32 from the rounded values, as the kernels sum 16-bit products in fp32); masks barely move."""
    rgb, first = blackswan_frames(shared_data, 4, tmp_path)
    encoders = load_encoder(None, "model+lab", CPU)
    inputs = []

    def spy(query, refs, values, radius, temperature, topk):
        inputs.append((query, refs, values))
        return orig(query, refs, values, radius, temperature, topk)

    orig = propagate.local_attention
    monkeypatch.setattr(propagate, "local_attention", spy)
    masks = {p: list(propagate_masks(rgb, first, PropagationConfig(precision=p), encoders, CPU))
             for p in ("fp32", "fp16")}
    for t in (t for q_k_v in inputs[3:] for t in q_k_v):  # the fp16 run's calls
        assert t.dtype == torch.float32 and torch.equal(t, t.half().float())
    assert not all(torch.equal(t, t.half().float()) for t in inputs[0])  # fp32's are not rounded
    for a, b in zip(masks["fp32"][1:], masks["fp16"][1:]):
        assert (a != b).mean() < 0.005 and (b > 0).sum() > 1000
    with pytest.raises(ValueError, match="fp16's range"):
        list(propagate_masks(rgb, first, PropagationConfig(precision="fp16", lab_temperature=1e-5), encoders, CPU))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        list(propagate_masks(rgb, first, PropagationConfig(precision="fp8"), encoders, CPU))
    assert propagate.storage_dtype(PropagationConfig(), torch.device("cuda")) == torch.float16
    assert propagate.storage_dtype(PropagationConfig(), CPU) == torch.float32


def test_precision_sets_the_encoders_arithmetic(monkeypatch, capsys):
    """fp32: the model's own fp32 forward; fp16: bf16 autocast, channels-last (features within rounding of fp32);
    auto on a CPU: whichever the probe finds faster, its numbers and the choice said on stderr."""
    rgb = torch.rand(1, 3, 64, 96)
    net, _, _ = model.load_checkpoint(model.DEFAULT_CHECKPOINT)
    with torch.no_grad():
        plain = net(rgb)
    fp32, _ = load_encoder(None, "model", CPU, "fp32")[0](rgb)
    bf16, _ = load_encoder(None, "model", CPU, "fp16")[0](rgb)
    assert torch.equal(fp32, plain) and bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=1).min() > 0.99
    for faster, expected in ((False, fp32), (True, bf16)):  # model.encoder_in_bf16's probe, of the forward
        monkeypatch.setattr(model, "probe_bf16", lambda backward, f=faster: (f and not backward, 0.2, 0.1, True))
        auto, _ = load_encoder(None, "model", CPU, "auto")[0](rgb)
        assert torch.equal(auto, expected)
        probe, choice = capsys.readouterr().err.strip().splitlines()
        assert probe.startswith("bf16 probe (cached)") and choice == f"encoding in {'bf16' if faster else 'fp32'} " \
            "(--precision to choose)"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        load_encoder(None, "model", CPU, "fp8")


# A run that gets `signal` as it hands frame 1 (the second frame) to the writer: os.kill from inside, so that the
# signal lands at a known frame on any machine, not after a sleep
SIGNAL_DURING_FRAME_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import media, propagate
add, added = media.Results.add, []
def add_then_signal(self, frame, result):
    add(self, frame, result)
    added.append(frame)
    if len(added) == 2:
        os.kill(os.getpid(), signal.{name})
media.Results.add = add_then_signal
propagate.cli(sys.argv[1:])
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_stops_after_the_frame_under_way(shared_data, tmp_path, sig, code):
    """SIGTERM, SIGINT or SIGHUP: the frame under way is finished, every frame before the stop is written and
    readable, no temporary file is left, and the run says so in one line and exits with 128 + the signal."""
    frames = copy_clip(shared_data, "blackswan", 8, tmp_path / "blackswan")
    mask = tmp_path / "first.png"
    annotation(shared_data, "blackswan", 0).save(mask)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", SIGNAL_DURING_FRAME_1.format(root=str(ROOT), name=sig.name),
                          str(frames), str(mask), "--out", str(out), "--features", "lab"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == code, run.stderr
    assert run.stderr.splitlines()[-1].startswith(f"stopped by {sig.name}: 2 of 8 frames written to {out}; ")
    assert "--overwrite" in run.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "overlay.mp4"]  # no .tmp files
    assert all(read_png(out / f"0000{i}.png").shape == (SIZE[1], SIZE[0]) for i in range(2))
    assert iio.imread(out / "overlay.mp4", plugin="pyav").shape[0] == 2


def test_an_error_mid_video_says_how_many_frames_were_written(clip, tmp_path):
    frames, mask = clip
    (frames / "00002.jpg").write_bytes(b"not a jpeg")  # the third frame cannot be read
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"00002.jpg.* \(2 of 4 frames written to .*out\)$"):
        main(frames, mask, out, PropagationConfig(features="lab"), None, "cpu")
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]  # the overlay of a failed run goes


def test_frames_propagates_the_first_n_and_the_last_line_names_the_folder(clip, tmp_path, capsys):
    frames, mask = clip
    out = tmp_path / "out"
    propagate.cli([str(frames), str(mask), "--out", str(out), "--features", "lab", "--frames", "3"])
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert iio.imread(out / "overlay.mp4", plugin="pyav").shape[0] == 3
    assert capsys.readouterr().out.splitlines()[-1] == f"blackswan: 3 of 3 frames written to {out} (and overlay.mp4)"
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"sequence": "blackswan", "frame_size": list(SIZE), "frames": [1],
                                  "xy": [[[80, 40]]], "visible": [[True]]}))
    main(frames, points, tmp_path / "pts", PropagationConfig(features="lab"), None, "cpu", overlay=False, frames=2)
    assert json.loads((tmp_path / "pts" / "points.json").read_text())["frames"] == [1, 2]
