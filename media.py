"""Reading and writing files: videos (files decoded with PyAV, or folders of JPEG/PNG frames), first-frame masks and
keypoints, and what propagate.py writes (palette PNGs, points.json, the overlay video), each file through a temporary
one renamed into place (files.py). No torch here: evaluate.py scores with this module alone.
"""
import contextlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import imageio.v3 as iio
import numpy as np
from PIL import Image

from files import atomic_path, atomic_write

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class VideoError(ValueError):
    """A video that is missing, cannot be opened or cannot be decoded. The message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Videos


def _natural_key(name: str):
    # "2.jpg" before "10.jpg": frame folders are not always zero-padded
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_files(folder: Path) -> list:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def find_videos(root: Union[str, Path]) -> list:
    """Every video under `root`, sorted by relative path: video files, and folders that directly hold >= 1 image
    (one such folder is one video; it is not searched further). Hidden files and folders are ignored."""
    root = Path(root)
    videos, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or the same folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files = [f for f in files if not f.startswith(".")]
        if folder != str(root) and any(Path(f).suffix.lower() in IMAGE_EXTS for f in files):
            videos.append(Path(folder))
            dirs[:] = []
            continue
        videos += [Path(folder) / f for f in files if Path(f).suffix.lower() in VIDEO_EXTS]
    return sorted(videos, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """Any decoded image -> (H, W, 3) uint8: grey is repeated, alpha dropped, 16 bits cut to 8."""
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif frame.dtype != np.uint8:
        raise ValueError(f"unsupported frame dtype {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.shape[2] in (1, 2):  # grey, or grey + alpha
        frame = np.repeat(frame[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(frame[:, :, :3])


def _one_line(error: Exception, path: Path) -> str:
    # FFmpeg's messages end with the file name, which ours already give
    return f"{type(error).__name__}: {error}".replace(f": '{path}'", "").replace("\n", " ")


def _pyav():
    """PyAV, imported where a video file is read: frame folders, the colour code and everything that does not read
    video (the kernels, their tests and benchmarks) work without it."""
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV: pip install av") from None
    return av


def read_frames(path: Union[str, Path], indices: Optional[Iterable[int]] = None) -> Iterator[np.ndarray]:
    """Stream the frames of a video file or frame folder as (H, W, 3) uint8 RGB, one at a time.

    `indices`, if given, selects frames (0-based): only those are converted and yielded, in increasing order, and
    decoding stops after the last of them. Raises VideoError for a missing path or an unreadable video.

    Video files are decoded with PyAV (the decoder behind imageio's "pyav" plugin) rather than `imageio.v3.imiter`,
    because imiter converts every decoded frame to RGB; skipping that for frames we do not keep makes reading a
    triplet near the end of a clip about 4x faster.
    """
    path = Path(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    if wanted is not None and not wanted:
        return
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    if path.is_dir():
        files = _image_files(path)
        for i in (range(len(files)) if wanted is None else [i for i in wanted if i < len(files)]):
            try:
                frame = iio.imread(files[i])
            except Exception as e:
                raise VideoError(f"cannot read frame {files[i]}: {_one_line(e, files[i])}") from e
            yield _to_rgb(frame)
        return
    last, wanted = (None, None) if wanted is None else (wanted[-1], set(wanted))
    av = _pyav()
    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoError(f"cannot open video {path}: {_one_line(e, path)}") from e
    with container:  # closed also when the caller stops iterating early (GeneratorExit)
        if not container.streams.video:
            raise VideoError(f"no video stream in {path}")
        decoded = container.decode(container.streams.video[0])
        i = 0
        while last is None or i <= last:
            try:
                frame = next(decoded, None)
                keep = frame is not None and (wanted is None or i in wanted)
                rgb = _to_rgb(frame.to_ndarray(format="rgb24")) if keep else None  # the costly part: only if kept
            except Exception as e:
                raise VideoError(f"cannot decode frame {i} of {path}: {_one_line(e, path)}") from e
            if frame is None:
                return
            if keep:
                yield rgb
            i += 1


def count_frames(path: Union[str, Path]) -> int:
    """Number of frames: the container's count when it stores one (mp4, mkv...), else by decoding (no RGB
    conversion). A frame folder counts its images. Raises VideoError like `read_frames`."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    if path.is_dir():
        return len(_image_files(path))
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path}")
            stream = container.streams.video[0]
            if stream.frames > 0:
                return stream.frames
            return sum(1 for _ in container.decode(stream))
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot read video {path}: {_one_line(e, path)}") from e



# ----------------------------------------------------------------------------------------------------------------
# Masks, keypoints and their files


def davis_palette() -> list[int]:
    """The DAVIS (PASCAL VOC) colour map: the bits of an index spread over the high bits of R, G and B."""
    palette = []
    for i in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for c in range(3):
                rgb[c] |= ((i >> (3 * bit + c)) & 1) << (7 - bit)
        palette += rgb
    return palette


def read_mask(path: Path) -> tuple[np.ndarray, Optional[list[int]]]:
    """A mask PNG -> (object ids (H, W) uint8, its palette or None). Palette PNGs give their indices; a grey PNG its
    levels as ids, except a binary 0/255 one, whose 255 becomes object 1."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, palette, ids = img.mode, img.getpalette() if img.mode == "P" else None, np.array(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the mask ({type(e).__name__})") from None
    if ids.ndim == 3:  # RGB(A): accepted only when grey
        if not (ids[..., 0] == ids[..., 1]).all() or not (ids[..., 1] == ids[..., 2]).all():
            raise ValueError(f"{path}: a colour mask; save it as a palette PNG or a grey-level PNG of object ids")
        ids = ids[..., 0]
    if ids.max() > 255:
        raise ValueError(f"{path}: object ids above 255 do not fit a palette PNG")
    ids = ids.astype(np.uint8)
    if mode != "P" and set(np.unique(ids)) <= {0, 255}:
        ids = (ids == 255).astype(np.uint8)  # binary mask: one object
    return ids, palette


def read_points(path: Path) -> tuple[str, int, np.ndarray, np.ndarray]:
    """A keypoint JSON -> (sequence, first labelled frame, points (J, 2) of that frame, visible (J,) bool)."""
    try:
        gt = json.loads(Path(path).read_text())
        start = int(gt["frames"][0])
        xy = np.asarray(gt["xy"][0], dtype=np.float64).reshape(-1, 2)  # (J, 2)
        visible = np.asarray(gt["visible"][0], dtype=bool).reshape(len(xy))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a keypoint JSON with frames, xy and visible ({type(e).__name__})") from None
    if start < 0 or not visible.any():
        raise ValueError(f"{path}: no visible point in the first labelled frame")
    return str(gt.get("sequence", Path(path).stem)), start, xy, visible


def read_label_png(path: Path) -> np.ndarray:
    """(H, W) uint8 label map from a palette or grey PNG (palette indices, not colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"{path}: expected a palette or grey PNG of object ids, got mode {im.mode}")
            return np.array(im)
    except (OSError, SyntaxError) as e:  # PIL's messages for a truncated file do not name it
        raise ValueError(f"{path}: cannot read the PNG ({type(e).__name__})") from None


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # json's own message does not name the file
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__})") from None


def all_joints(tracked: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Tracked points (J', 2) of the joints visible in the first labelled frame -> (J, 2), nan for the others."""
    full = np.full((len(visible), 2), np.nan)
    full[visible] = tracked
    return full


def json_points(full: np.ndarray) -> list:
    """(J, 2) points -> the points JSON's row: [x, y] rounded to 0.01 px, null where untracked (nan)."""
    return [None if np.isnan(p[0]) else [round(float(p[0]), 2), round(float(p[1]), 2)] for p in full]


def check_points_inside(path: Path, xy: np.ndarray, visible: np.ndarray, W: int, H: int) -> None:
    """Visible points must lie in the W x H frame: outside, a point has no features to follow."""
    for j in np.flatnonzero(visible):
        x, y = xy[j]
        if not (0 <= x < W and 0 <= y < H):  # also refuses nan
            raise ValueError(f"{path}: point {j} at ({x:g}, {y:g}) lies outside the {W}x{H} frame")


RESULT_NAMES = ("points.json", "overlay.mp4")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds results, unless overwrite: then remove those results."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: the output needs a folder (--out)")
    results = [p for p in out.glob("*") if p.name in RESULT_NAMES or (p.suffix == ".png" and p.stem.isdigit())]
    if results and not overwrite:
        raise ValueError(f"{out} already holds results ({len(results)} files); pass --overwrite to replace them")
    for p in results:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def save_png(labels: np.ndarray, palette: Optional[list[int]], path: Path) -> None:
    """Write (H, W) uint8 ids as a palette PNG (a grey one without a palette), atomically: a temporary file renamed
    into place; a failed write is one OSError naming `path`."""
    img = Image.fromarray(labels)  # mode L; a palette turns it into P
    if palette:
        img.putpalette(palette)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def video_fps(video: Path) -> float:
    """Frames per second of a video file (24 for a folder of frames or unknown)."""
    try:
        return 24.0 if video.is_dir() else float(iio.immeta(video, plugin="pyav").get("fps") or 24.0)
    except Exception:  # the frames reader reports unreadable videos itself
        return 24.0


@contextlib.contextmanager
def overlay_video(path: Path, fps: float):
    """Yields write(frame) for an H.264 mp4 (MPEG-4 without libx264), frames cropped to even sizes. The video goes
    to a temporary file that replaces `path` when the block ends without an error and is removed otherwise."""
    with atomic_path(path) as tmp:
        file = iio.imopen(tmp, "w", plugin="pyav")
        try:
            av = _pyav()
            file.init_video_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", fps=fps)

            def write(frame: np.ndarray) -> None:
                H, W = frame.shape[:2]
                file.write_frame(np.ascontiguousarray(frame[:H - H % 2, :W - W % 2]))

            yield write
        finally:
            file.close()


def blend_mask(frame: np.ndarray, labels: np.ndarray, palette: list[int]) -> np.ndarray:
    colours = np.asarray(palette, dtype=np.float32).reshape(-1, 3)[labels]  # (H, W, 3)
    alpha = 0.5 * (labels > 0)[..., None]
    return (frame * (1 - alpha) + colours * alpha).astype(np.uint8)


def draw_points(frame: np.ndarray, points: np.ndarray, palette: list[int], radius: int = 4) -> np.ndarray:
    out = frame.copy()
    ys, xs = np.mgrid[:frame.shape[0], :frame.shape[1]]
    for j, (x, y) in enumerate(points):
        if np.isfinite(x) and np.isfinite(y):
            out[(xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2] = palette[3 * (j + 1):3 * (j + 2)]
    return out


class Results(contextlib.AbstractContextManager):  # `with` gives the instance itself
    """What propagate.py writes into `out`, frame by frame: a palette PNG per mask (00000.png ...), or one row of
    points.json per frame of keypoints (`points`: the sequence's name, its first labelled frame and which joints it
    tracks); and with `overlay_fps`, overlay.mp4, the frames with the masks blended in or the points drawn.

    A thread writes the frames in order while the caller computes the next; `add` or `wait` raise a failed write.
    However the `with` block ends (an error, a stop between two frames), every frame added before is complete on disk
    (points.json is written at the end), no temporary file is left, and overlay.mp4 is kept unless the block ends with
    an error. `count` is the number of frames written."""

    def __init__(self, out: Path, palette: list[int], overlay_fps: Optional[float] = None,
                 points: Optional[tuple[str, int, np.ndarray]] = None):
        self.out, self.palette, self.points = out, palette, points
        self.count, self.rows, self.size = 0, [], None
        self._files = contextlib.ExitStack()
        self._overlay = self._files.enter_context(overlay_video(out / "overlay.mp4", overlay_fps)) \
            if overlay_fps else None
        self._writer, self._pending = ThreadPoolExecutor(1), None  # one write at a time, one frame queued at most

    def add(self, frame: np.ndarray, result: np.ndarray) -> None:
        """The next frame (H, W, 3) uint8 and its result: (H, W) object ids, or (J', 2) tracked points."""
        self.wait()
        self._pending = self._writer.submit(self._write, frame, result)

    def wait(self) -> None:
        """Until every frame added is written; raises the error of a failed write."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, frame: np.ndarray, result: np.ndarray) -> None:
        self.size = frame.shape[1], frame.shape[0]
        if self.points is None:
            save_png(result, self.palette, self.out / f"{self.count:05d}.png")
            shown = blend_mask(frame, result, self.palette) if self._overlay else None
        else:
            full = all_joints(result, self.points[2])
            self.rows.append(json_points(full))
            shown = draw_points(frame, full, self.palette) if self._overlay else None
        if self._overlay:
            self._overlay(shown)
        self.count += 1

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.wait()  # the last frame's write failing is an error of the block
        except BaseException:
            exc = sys.exc_info()
            raise
        finally:
            self._writer.shutdown()  # after an error, the write under way is finished too
            self._files.__exit__(*exc)
            if self.points is not None and self.rows:
                sequence, start, _ = self.points
                doc = {"sequence": sequence, "frame_size": list(self.size),
                       "frames": list(range(start, start + len(self.rows))), "xy": self.rows}
                with atomic_write(self.out / "points.json", "w") as f:
                    f.write(json.dumps(doc))
