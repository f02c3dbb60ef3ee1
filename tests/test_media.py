"""media.py: finding and reading videos and frame folders, and what propagate.py writes (Results)."""
import json

import imageio.v3 as iio
import numpy as np
import pytest

import media


def write_video(path, n_frames, h=32, w=48, seed=0):
    frames = np.random.default_rng(seed).integers(0, 256, (n_frames, h, w, 3), dtype=np.uint8)
    iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=10)


def test_find_videos(tmp_path):
    for name in ["b_class/z.webm", "a_class/y.AVI", "a_class/x.mp4", "a_class/notes.txt", "c.MOV", "d.mkv",
                 "frames/seq1/00000.jpg", "frames/seq1/00001.jpg", "frames/seq2/0.PNG", ".hidden/h.mp4",
                 "e/.tmp.mp4", "labels/a.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "empty").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in media.find_videos(tmp_path)]
    assert found == ["a_class/x.mp4", "a_class/y.AVI", "b_class/z.webm", "c.MOV", "d.mkv", "frames/seq1",
                     "frames/seq2"]
    assert found == [p.relative_to(tmp_path).as_posix() for p in media.find_videos(str(tmp_path))]


def test_read_frame_folder(tmp_path):
    grey = np.full((6, 8), 7, np.uint8)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    iio.imwrite(tmp_path / "2.png", grey)
    iio.imwrite(tmp_path / "10.png", rgba)
    frames = list(media.read_frames(tmp_path))  # natural order: 2 before 10
    assert [f.shape for f in frames] == [(6, 8, 3)] * 2 and all(f.dtype == np.uint8 for f in frames)
    assert (frames[0] == 7).all() and (frames[1][..., 0] == 200).all() and (frames[1][..., 1:] == 0).all()
    assert media.count_frames(tmp_path) == 2
    assert len(list(media.read_frames(tmp_path, [1]))) == 1


def test_read_video_file(tmp_path):
    write_video(tmp_path / "v.mp4", 12)
    assert media.count_frames(tmp_path / "v.mp4") == 12
    frames = list(media.read_frames(tmp_path / "v.mp4"))
    assert len(frames) == 12 and frames[0].shape == (32, 48, 3) and frames[0].dtype == np.uint8
    picked = list(media.read_frames(tmp_path / "v.mp4", [9, 2, 5]))
    assert len(picked) == 3 and all(np.array_equal(a, frames[i]) for a, i in zip(picked, [2, 5, 9]))


def test_read_errors_name_the_file(tmp_path):
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    for path in [tmp_path / "missing.mp4", tmp_path / "x.mp4"]:
        with pytest.raises(media.VideoError, match=path.name):
            list(media.read_frames(path))
        with pytest.raises(media.VideoError, match=path.name):
            media.count_frames(path)


def test_results_keep_every_frame_before_a_failed_write(tmp_path, monkeypatch):
    """Frames are written by a thread: a failed write is raised by the next add (or wait), the frames after it are
    not written, the ones before are complete, and no temporary file or partial overlay is left."""
    save_png = media.save_png

    def fail_on_frame_2(labels, palette, path):
        if path.name == "00002.png":
            raise OSError(28, "No space left on device")
        save_png(labels, palette, path)

    monkeypatch.setattr(media, "save_png", fail_on_frame_2)
    frame, labels = np.zeros((10, 12, 3), np.uint8), np.ones((10, 12), np.uint8)
    with pytest.raises(OSError, match="No space"):
        with media.Results(tmp_path, media.davis_palette(), overlay_fps=10.0) as results:
            for _ in range(5):
                results.add(frame, labels)
            results.wait()
    assert results.count == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png"]
    assert (np.array(media.Image.open(tmp_path / "00001.png")) == 1).all()


def test_results_write_the_points_of_the_frames_done(tmp_path):
    visible = np.array([True, False, True])
    with pytest.raises(RuntimeError):
        with media.Results(tmp_path, media.davis_palette(), points=("dog", 4, visible)) as results:
            for x in (1.0, 2.0):
                results.add(np.zeros((8, 8, 3), np.uint8), np.array([[x, 1.0], [x, 2.0]]))
            raise RuntimeError("the video ended early")
    doc = json.loads((tmp_path / "points.json").read_text())
    assert doc == {"sequence": "dog", "frame_size": [8, 8], "frames": [4, 5],
                   "xy": [[[1.0, 1.0], None, [1.0, 2.0]], [[2.0, 1.0], None, [2.0, 2.0]]]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["points.json"]
