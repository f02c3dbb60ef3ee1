"""data.py: Lab colour, the quantiser, colour jitter, the clip dataset, its epoch and its index cache."""
import colorsys
import os
import shutil
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import data

GOOD_CLIPS = ("davis16-rollerblade.mp4", "imageio_realshort.mp4")  # 35 and 36 frames: the shortest usable ones


def write_video(path, n_frames, h=32, w=48, seed=0):
    frames = np.random.default_rng(seed).integers(0, 256, (n_frames, h, w, 3), dtype=np.uint8)
    iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=10)


def image(*colours):
    """A (3, 4, 4 * len(colours)) image of vertical bands, one per RGB colour in [0, 1]."""
    return torch.tensor(colours, dtype=torch.float32).T[:, None, :, None].expand(3, 4, len(colours), 4).reshape(
        3, 4, 4 * len(colours))


# ---------------------------------------------------------------- colour

@pytest.mark.parametrize("rgb, lab", [
    ((1, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 1, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 1), (32.30, 79.19, -107.86)),
    ((1, 1, 1), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rgb_to_lab_known_values(rgb, lab, dtype):
    x = torch.tensor(rgb, dtype=dtype)[None, :, None, None].expand(2, 3, 3, 5)  # batched, non-contiguous
    out = data.rgb_to_lab(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out[1, :, 2, 4], torch.tensor(lab, dtype=dtype), atol=0.02, rtol=0)


def test_quantise_known_colours():
    colours = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (0.5, 0.5, 0.5)]
    centroids = data.rgb_to_lab(image(*colours))[1:, 0, ::4].T  # (7, 2): (a, b) of each colour
    img = image(*colours[::-1])  # bands in reverse order
    expected = torch.arange(len(colours)).flip(0).repeat_interleave(4).expand(4, -1)  # (4, 28)
    labels = data.quantise(img, centroids)
    assert labels.dtype == torch.long and labels.shape == (4, 28)
    assert torch.equal(labels, expected)
    batched = data.quantise(torch.stack([img, image(*colours)]), centroids.double())  # (2, 3, H, W) -> (2, H, W)
    assert torch.equal(batched[0], expected) and torch.equal(batched[1], expected.flip(-1))


def test_hsv_round_trip_matches_colorsys():
    rgb = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    hsv = data._rgb_to_hsv(rgb)
    ref = torch.tensor([colorsys.rgb_to_hsv(*rgb[:, i, j].tolist()) for i in range(5) for j in range(7)])
    assert_close(hsv.permute(1, 2, 0).reshape(-1, 3), ref, atol=1e-5, rtol=0)
    assert_close(data._hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)


def test_colour_jitter():
    frame = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = frame.expand(4, 3, 16, 16)  # four copies of one frame
    out = data.colour_jitter(frames, generator=torch.Generator().manual_seed(1))
    assert out.shape == frames.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, frames)
    for t in range(1, 4):  # factors drawn per frame: identical inputs come out different
        assert (out[t] - out[0]).abs().max() > 1e-3
    again = data.colour_jitter(frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert (out - frames).abs().max() < 0.5  # strength 0.1 is mild
    assert_close(data.colour_jitter(frames, strength=0.0), frames, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the dataset

@pytest.fixture
def clip_folder(tmp_path, shared_data):
    """Two real clips (symlinked), a corrupt file and a 3-frame video, in class folders."""
    root = tmp_path / "videos"
    (root / "real").mkdir(parents=True)
    (root / "bad").mkdir()
    for name in GOOD_CLIPS:
        os.symlink(shared_data / "train_videos_256" / name, root / "real" / name)
    (root / "bad" / "x.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    write_video(root / "bad" / "short.mp4", 3)
    return root


@pytest.mark.filterwarnings("ignore:skipping")
def test_dataset_skips_bad_videos_and_samples_clips(clip_folder):
    with pytest.warns(UserWarning) as record:
        ds = data.ClipDataset(clip_folder, size=64, jitter_p=0.0)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any("x.mp4" in m for m in messages) and any("short.mp4" in m and "3 frames" in m for m in messages)
    assert sorted(p.name for p, _ in ds.skipped) == ["short.mp4", "x.mp4"]
    assert sorted(p.name for p, _ in ds.videos) == sorted(GOOD_CLIPS)
    assert len(ds) == 3 + 3  # an epoch as CorrFlow's: frames 1, 5, 9 | 13, 17, 21 | 25, 29, 33 of 35 or 36
    sample = ds[0]
    assert sample["frames"].shape == sample["clean"].shape == (3, 3, 64, 64)
    assert sample["clean"].dtype == torch.float32 and 0 <= sample["clean"].min() and sample["clean"].max() <= 1
    assert torch.equal(sample["frames"], sample["clean"])  # jitter_p = 0: no jitter
    # sample n depends on (seed, n) only: not on the global RNG, the instance or the order of requests
    torch.manual_seed(123)
    assert torch.equal(data.ClipDataset(clip_folder, size=64, jitter_p=0.0)[0]["clean"], sample["clean"])
    other = data.ClipDataset(clip_folder, size=64, jitter_p=0.0, seed=1)
    assert not all(torch.equal(other[n]["clean"], ds[n]["clean"]) for n in range(3))


def test_every_clip_start_is_equally_likely(tmp_path, monkeypatch):
    write_video(tmp_path / "short.mp4", 12)  # 4 starts of a 9-frame clip
    write_video(tmp_path / "long.mp4", 40)  # 32 starts
    ds = data.ClipDataset(tmp_path, size=16, jitter_p=0.0)
    drawn = []
    monkeypatch.setattr(ds, "load_clip",
                        lambda path, start: drawn.append((path.name, start)) or torch.rand(3, 3, 16, 16))
    for n in range(3000):
        ds[n]
    assert len(ds) == 1 + 3  # 12 frames: 1, 5, 9; 40 frames: three clips (1 .. 33); not 12 // 9 + 40 // 9
    assert set(drawn) == {("short.mp4", s) for s in range(4)} | {("long.mp4", s) for s in range(32)}
    share = sum(name == "short.mp4" for name, _ in drawn) / len(drawn)
    assert abs(share - 4 / 36) < 0.02, share  # by starts, not one video in two


def test_every_video_is_equally_likely_with_sampling_videos(tmp_path, monkeypatch):
    write_video(tmp_path / "short.mp4", 12)  # 4 starts
    write_video(tmp_path / "long.mp4", 40)  # 32 starts
    ds = data.ClipDataset(tmp_path, size=16, jitter_p=0.0, sampling="videos")
    drawn = []
    monkeypatch.setattr(ds, "load_clip",
                        lambda path, start: drawn.append((path.name, start)) or torch.rand(3, 3, 16, 16))
    for n in range(2000):
        ds[n]
    assert set(drawn) == {("short.mp4", s) for s in range(4)} | {("long.mp4", s) for s in range(32)}
    share = sum(name == "short.mp4" for name, _ in drawn) / len(drawn)
    assert abs(share - 0.5) < 0.04, share  # one video in two, whatever their lengths


def test_crops_keep_the_aspect_and_the_scale(tmp_path):
    write_video(tmp_path / "wide.mp4", 12, h=32, w=64)
    ds = data.ClipDataset(tmp_path, size=16, crop=12, jitter_p=0.0)
    whole = ds.load_clip(ds.videos[0][0], 0)
    assert whole.shape == (3, 3, 16, 32)  # the short side at `size`, the aspect kept
    for n in range(5):
        clip = ds[n]["clean"]
        assert clip.shape == (3, 3, 12, 12)
        # a window of one of the video's scaled clips, the same window in all three frames
        starts = [ds.load_clip(ds.videos[0][0], s) for s in range(4)]
        assert any(torch.equal(clip, c[..., t:t + 12, l:l + 12]) for c in starts for t in range(5) for l in range(21))
    with pytest.raises(ValueError, match="does not fit"):
        data.ClipDataset(tmp_path, size=16, crop=20)


def test_min_scale_zooms_out_of_the_crop(tmp_path, monkeypatch):
    write_video(tmp_path / "wide.mp4", 12, h=32, w=64)
    ds = data.ClipDataset(tmp_path, size=32, crop=12, jitter_p=0.0, min_scale=0.5)
    frame = torch.empty(3, 32, 64)
    frame[0], frame[1], frame[2] = torch.arange(64.0) / 64, 0.2, 0.8  # red ramps: its slope in a crop tells the zoom
    monkeypatch.setattr(ds, "load_clip", lambda path, start: frame.expand(3, 3, 32, 64).clone())
    slopes = []
    for n in range(200):
        clip = ds[n]["clean"]
        assert clip.shape == (3, 3, 12, 12) and torch.equal(clip[0], clip[2])  # one window for the three frames
        slopes.append(float(clip[0, 0, 6, 7] - clip[0, 0, 6, 4]) / 3 * 64)  # pixels of the frame per crop pixel
    slopes = torch.tensor(slopes)
    # zoom s drawn from [0.5, 1]: a crop pixel spans 1/s frame pixels, 1 to 2 (windows are whole pixels: 12 to 24)
    assert slopes.min() > 0.97 and slopes.max() < 2.03, (slopes.min(), slopes.max())
    assert slopes.min() < 1.1 and slopes.max() > 1.85 and 1.3 < slopes.mean() < 1.6, slopes
    # min_scale 1 draws nothing more: the stream of an unzoomed run is unchanged
    plain = data.ClipDataset(tmp_path, size=32, crop=12, jitter_p=0.0)
    same = data.ClipDataset(tmp_path, size=32, crop=12, jitter_p=0.0, min_scale=1.0)
    assert all(torch.equal(plain[n]["clean"], same[n]["clean"]) for n in range(3))
    with pytest.raises(ValueError, match="only with a crop"):
        data.ClipDataset(tmp_path, size=32, min_scale=0.5)


def test_black_and_white_videos_are_skipped_with_a_warning(tmp_path):
    write_video(tmp_path / "colour.mp4", 12)
    grey = np.random.default_rng(1).integers(0, 256, (12, 32, 48, 1), dtype=np.uint8).repeat(3, axis=3)
    iio.imwrite(tmp_path / "grey.mp4", grey, plugin="pyav", codec="libx264", fps=10)
    ds = data.ClipDataset(tmp_path, size=16, jitter_p=0.0, sampling="videos")
    with pytest.warns(UserWarning, match="grey.mp4: no colour") as record:
        clips = [ds[n]["clean"] for n in range(40)]
    assert len([w for w in record if "no colour" in str(w.message)]) == 1  # once, then the video is left out
    assert all((c.amax(1) - c.amin(1)).mean() > data.GREY_SPREAD for c in clips)


def test_run_batches_split_global_batches():
    one = list(data.RunBatches(4, 2, 5))
    assert one == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]] and len(data.RunBatches(4, 2, 5)) == 3
    halves = [list(data.RunBatches(2, 2, 5, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == one  # the same samples over two processes
    # a run continuing another (--init) starts its stream after the other's samples
    assert list(data.RunBatches(4, 0, 2, offset=100)) == [[100, 101, 102, 103], [104, 105, 106, 107]]


@pytest.mark.filterwarnings("ignore:skipping")
def test_in_memory_clips_match_decoded_ones(clip_folder):
    decoded = data.ClipDataset(clip_folder, size=32, jitter_p=0.5)
    memory = data.ClipDataset(clip_folder, size=32, jitter_p=0.5, in_memory=True)
    assert set(memory.frames) == {p for p, _ in decoded.videos}
    for n in range(4):
        a, b = decoded[n], memory[n]
        assert_close(b["clean"], a["clean"], atol=0.5 / 255 + 1e-6, rtol=0)  # rounded to 8 bits
        assert_close(b["frames"], a["frames"], atol=0.05, rtol=0)


@pytest.mark.filterwarnings("ignore:skipping")
def test_dataset_jitter_and_frame_gap(clip_folder):
    ds = data.ClipDataset(clip_folder, num_frames=2, frame_gap=3, size=32, jitter_p=1.0)
    assert ds.span == 4
    sample = ds[1]
    assert sample["frames"].shape == (2, 3, 32, 32)
    assert not torch.equal(sample["frames"], sample["clean"]) and 0 <= sample["frames"].min() <= 1
    # a clip is what read_frames gives for its indices, resized
    path = ds.videos[1][0]
    frames = list(data.read_frames(path, [5, 8]))
    expected = torch.stack([F.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255, size=(32, 32),
                                          mode="bilinear", align_corners=False, antialias=True)[0] for f in frames])
    assert_close(ds.load_clip(path, 5), expected.clamp(0, 1), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:skipping")
def test_dataset_survives_a_video_failing_mid_training(clip_folder, monkeypatch):
    ds = data.ClipDataset(clip_folder, size=32)
    broken, real_read = ds.videos[0][0], data.read_frames

    def read(path, indices=None):
        if path == broken:
            raise data.VideoError(f"cannot decode frame 3 of {path}")
        return real_read(path, indices)

    monkeypatch.setattr(data, "read_frames", read)
    with pytest.warns(UserWarning, match=broken.name):
        samples = [ds[n] for n in range(20)]  # some of these draw the broken video
    assert all(s["clean"].shape == (3, 3, 32, 32) for s in samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for n in range(20):
            ds[n]


@pytest.mark.filterwarnings("ignore:skipping")
def test_index_is_cached(clip_folder, monkeypatch):
    ds = data.ClipDataset(clip_folder, size=32)
    assert ds.index_file == clip_folder / data.INDEX_NAME and ds.index_file.exists()

    def fail(path):
        raise AssertionError(f"decoded {path} although the index knew it")

    monkeypatch.setattr(data, "count_frames", fail)
    again = data.ClipDataset(clip_folder, size=32)
    assert again.videos == ds.videos and again.skipped == ds.skipped and again.index_file is None
    # a changed file is looked at again, the others are not
    write_video(clip_folder / "bad" / "short.mp4", 12)
    monkeypatch.setattr(data, "count_frames", lambda path: 12)
    assert len(data.ClipDataset(clip_folder, size=32).videos) == 3


def test_index_falls_back_to_user_cache(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    write_video(root / "v.mp4", 12)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root.chmod(0o555)
    try:
        ds = data.ClipDataset(root, size=32)
        assert len(ds.videos) == 1 and not (root / data.INDEX_NAME).exists()
        assert ds.index_file.parent == tmp_path / "cache" / "corrflow" and ds.index_file.exists()
        monkeypatch.setattr(data, "count_frames", lambda path: pytest.fail("index not reused"))
        assert len(data.ClipDataset(root, size=32).videos) == 1
    finally:
        root.chmod(0o755)


def test_empty_or_unusable_folder_raises(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.ClipDataset(tmp_path)
    write_video(tmp_path / "short.mp4", 3)
    with pytest.raises(ValueError, match="no usable video.*short.mp4: 3 frames"):  # the reason, in one line
        data.ClipDataset(tmp_path)
    assert not (tmp_path / data.INDEX_NAME).exists()  # a folder that cannot train is left as it was
    with pytest.raises(ValueError, match="not found"):
        data.ClipDataset(tmp_path / "nope")


def test_fit_centroids_on_real_clips(shared_data):
    paths = [shared_data / "train_videos_256" / name for name in GOOD_CLIPS]
    centroids = data.fit_centroids(paths, n_frames=4, pixels_per_frame=500, seed=0)
    assert centroids.shape == (16, 2) and centroids.dtype == torch.float32 and torch.isfinite(centroids).all()
    assert torch.equal(centroids, data.fit_centroids(paths, n_frames=4, pixels_per_frame=500, seed=0))
    labels = data.quantise(torch.rand(2, 3, 8, 8), centroids)
    assert labels.shape == (2, 8, 8) and 0 <= labels.min() and labels.max() < 16
