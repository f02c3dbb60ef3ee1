"""Training data for CorrFlow: videos on disk -> random frame triplets, colour jitter, Lab colour and its quantiser.

`ClipDataset`: clips of frames `frame_gap` apart from the videos under a root folder (read by media.py; Kinetics
layout: one folder per class), as `clean` targets and colour-jittered `frames` inputs; an epoch as long as CorrFlow's
(about one clip per 12 frames). Frame counts are cached in `<root>/.corrflow_index.json` (or the user cache when the
root is read-only). `RunBatches` hands out the sample numbers of a run step by step. Targets are the (a, b) channels
of Lab snapped to the nearest of 16 k-means centroids: `fit_centroids` fits them, `quantise` applies them.
"""
import hashlib
import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from files import atomic_write
from media import VIDEO_EXTS, VideoError, count_frames, find_videos, read_frames

INDEX_NAME = ".corrflow_index.json"
INDEX_VERSION = 1
JITTER_STRENGTH = 0.1  # brightness, contrast, saturation and hue jitter (CorrFlow: 0.1 each)
SAMPLINGS = ("clips", "videos")  # every clip start equally likely (CorrFlow), or every video, then a start in it
GREY_SPREAD = 0.01  # a clip whose pixels' max - min over R, G, B averages below this has no colour to learn


# -----------------------------------------------------------------------------
# colour: sRGB -> Lab, HSV, colour jitter
def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) -> CIE Lab (D65 white), same shape: L in [0, 100], a and b about [-128, 127].
    Computed in at least float32 and returned in the input's dtype, on its device."""
    x = (rgb.float() if rgb.dtype in (torch.float16, torch.bfloat16) else rgb).clamp(0, 1)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)  # undo the sRGB gamma
    rgb_to_xyz = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                               [0.2126729, 0.7151522, 0.0721750],
                               [0.0193339, 0.1191920, 0.9503041]], dtype=x.dtype, device=x.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device)  # D65, Y = 1
    xyz = torch.einsum("ij,...jhw->...ihw", rgb_to_xyz, linear) / white[:, None, None]  # (..., 3, H, W)
    eps, kappa = 216 / 24389, 24389 / 27  # CIE constants: cube root above eps, a line below it
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    fx, fy, fz = f.unbind(-3)
    lab = torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)
    return lab.to(rgb.dtype)


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma, the weights torchvision uses: (..., 3, H, W) -> (..., 1, H, W)
    r, g, b = rgb.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> HSV with hue in [0, 1) turns."""
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(-3)
    delta = v - rgb.min(-3)[0]
    s = torch.where(v > 0, delta / v.clamp_min(1e-8), torch.zeros_like(v))
    d = delta.clamp_min(1e-8)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(-3)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # each sector of the hue circle takes (r, g, b) from a different permutation of (v, q, p, t)
    choices = [torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return torch.stack([c.gather(0, sector[None]).squeeze(0) for c in choices], dim=-3)


def colour_jitter(frames: torch.Tensor, strength: float = JITTER_STRENGTH,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, factors drawn independently for every frame.

    frames: (T, 3, H, W) in [0, 1] (any leading dims; each (3, H, W) image is one frame). torchvision's
    ColorJitter(s, s, s, s) semantics, the four operations applied in an order shuffled at every call (one order
    for all frames of the call): brightness multiplies by a factor in [1-s, 1+s]; contrast blends with the frame's
    mean grey level; saturation blends with the frame's greyscale; hue rotates by up to +-s turns in HSV.
    Returns a new tensor in [0, 1]."""
    x = frames.reshape(-1, *frames.shape[-3:])  # (N, 3, H, W)
    n = x.shape[0]
    # drawn on the CPU so that a CPU generator also works for frames on a GPU
    u = (torch.rand(4, n, generator=generator) * 2 - 1).to(x) * strength  # (4, N) in [-s, s]
    order = torch.randperm(4, generator=generator).tolist()
    factor = (1 + u[:3]).view(3, n, 1, 1, 1)
    for op in order:
        if op == 0:  # brightness
            x = (x * factor[0]).clamp(0, 1)
        elif op == 1:  # contrast
            mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
            x = (factor[1] * x + (1 - factor[1]) * mean).clamp(0, 1)
        elif op == 2:  # saturation
            x = (factor[2] * x + (1 - factor[2]) * _grey(x)).clamp(0, 1)
        else:  # hue
            hsv = _rgb_to_hsv(x)
            hue = (hsv[:, 0] + u[3].view(n, 1, 1)) % 1.0
            x = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)
    return x.reshape(frames.shape)


# -----------------------------------------------------------------------------
# the frame-count index, cached beside the videos
def _index_files(root: Path) -> list:
    """Where the index may live: in the data root, else in the user cache, named by the root's absolute path."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corrflow"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / INDEX_NAME, cache / f"index-{digest}.json"]


def _load_index(root: Path) -> dict:
    for file in _index_files(root):
        try:
            data = json.loads(file.read_text())
            if data.get("version") == INDEX_VERSION:
                return data["videos"]
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # missing, unreadable or from another version: try the next place, else start afresh
    return {}


def _save_index(root: Path, videos: dict) -> Optional[Path]:
    """Write atomically (temp file + rename), so a crash or a second process never leaves half a file."""
    text = json.dumps({"version": INDEX_VERSION, "videos": videos}, indent=0, sort_keys=True)
    for file in _index_files(root):
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            # a folder without write bits counts as read-only even for root, who could write into it anyway
            if not (os.access(file.parent, os.W_OK) and stat.S_IMODE(file.parent.stat().st_mode) & 0o222):
                continue
            with atomic_write(file, "w") as f:
                f.write(text)
            return file
        except OSError:
            continue
    warnings.warn(f"could not write the video index for {root}: it will be rebuilt at the next start")
    return None


# -----------------------------------------------------------------------------
# the dataset
class ClipDataset(torch.utils.data.Dataset):
    """Clips of `num_frames` frames `frame_gap` apart from the usable videos under `root`.

    Every valid start of every video is equally likely, so a 300-frame video gives 30 times the clips of a 10-frame
    one. `len()` is one epoch, CorrFlow's original one: each video's frames `frame_gap` apart from its second (1, 5, 9,
    13, ...) cut into consecutive clips of `num_frames`: ceil((n - 1) / gap) // num_frames clips of an n-frame video,
    about n / 12 for (0, 4, 8) (a 9-frame video is sampled, but adds none).

    Item n is sample number n of a run: its clip and jitter are drawn with a generator seeded by (seed, n), so a
    resumed run, or the same samples split over torchrun processes, sees the same data. A sample is {"frames":
    (T, 3, size, size) colour-jittered input, "clean": the same frames without jitter (the targets)}, in [0, 1]; frames
    are resized to size x size (aspect not kept), or with `crop` cropped from frames `size` on the short side.

    With `crop` and min_scale < 1, each sample is zoomed out by s drawn uniformly from [min_scale, 1]: a window of
    crop / s pixels is shrunk to crop x crop, so objects appear at s times the scale of `size`. in_memory=True
    decodes every video once, at construction, into uint8 frames at the training size, so that a fast GPU never waits
    on decoding; it costs 3 x size^2 bytes per frame of the whole set.
    """

    def __init__(self, root: Union[str, Path], num_frames: int = 3, frame_gap: int = 4, size: int = 256,
                 jitter_p: float = 0.1, seed: int = 0, in_memory: bool = False, cache: bool = True, crop: int = 0,
                 sampling: str = "clips", min_scale: float = 1.0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"video folder not found: {self.root}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
        if crop > size:
            raise ValueError(f"a {crop}x{crop} crop does not fit in frames {size} pixels on their short side")
        if not 0 < min_scale <= 1 or (min_scale < 1 and not crop):
            raise ValueError(f"min_scale {min_scale}: must be in (0, 1], and below 1 only with a crop (it zooms out)")
        self.num_frames, self.frame_gap, self.size, self.jitter_p = num_frames, frame_gap, size, jitter_p
        self.seed, self.crop, self.sampling, self.min_scale = seed, crop, sampling, min_scale
        self.span = (num_frames - 1) * frame_gap + 1  # frames a clip covers: 9 for CorrFlow's (0, 4, 8)
        paths = find_videos(self.root)
        cached = _load_index(self.root) if cache else {}
        index, todo = {}, []  # relative path -> {"size", "mtime_ns", and "frames" or "error"}; videos to count
        for path in paths:
            rel = path.relative_to(self.root).as_posix()
            try:
                st = path.stat()
            except OSError as e:  # e.g. a broken symlink
                index[rel] = {"size": -1, "mtime_ns": -1, "error": f"cannot stat {path}: {e.strerror}"}
                continue
            key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            entry = cached.get(rel)
            if entry and all(entry.get(k) == v for k, v in key.items()) and ("frames" in entry or "error" in entry):
                index[rel] = entry
            else:
                index[rel] = key
                todo.append((rel, path))
        # only videos that are new or changed since the index was written are opened
        for rel, path in tqdm(todo, desc=f"indexing {self.root}", disable=len(todo) < 200):
            try:
                index[rel]["frames"] = count_frames(path)
            except VideoError as e:
                index[rel]["error"] = str(e)
        self.videos, self.skipped = [], []  # [(path, n_frames)], [(path, reason)]
        for path in paths:
            entry = index[path.relative_to(self.root).as_posix()]
            reason = entry.get("error") or (f"{entry['frames']} frames, fewer than the {self.span} a clip spans"
                                            if entry["frames"] < self.span else None)
            if reason is None:
                self.videos.append((path, entry["frames"]))
            else:
                self.skipped.append((path, reason))
        # errors already name the file; "too short" does not
        why = [reason if str(path) in reason else f"video {path}: {reason}" for path, reason in self.skipped]
        if not self.videos:  # one line that says why, and the folder left as it was
            first = f"; the first: {why[0]}" if why else ""
            raise ValueError(f"no usable video in {self.root}: {len(paths)} found, {len(self.skipped)} skipped "
                             f"(a clip needs {self.span} frames; extensions {', '.join(VIDEO_EXTS)} or image "
                             f"folders){first}")
        for reason in why:
            warnings.warn(f"skipping {reason}")
        self.index_file = _save_index(self.root, index) if cache and index != cached else None
        # videos that failed to decode (warned about once per process) or had no colour, found while sampling
        self._failed, self._grey = set(), set()
        # clip starts of all videos end to end: start k of the run belongs to video bisect(ends, k)
        self._ends = np.cumsum([n - self.span + 1 for _, n in self.videos])
        self.frames = {} if in_memory else None  # path -> (n, 3, size, size) uint8
        if in_memory:
            for path, n in tqdm(self.videos, desc=f"decoding {self.root} into memory", unit="video"):
                try:
                    self.frames[path] = (self._resize(read_frames(path)) * 255).round().to(torch.uint8)
                except VideoError as e:
                    self._failed.add(path)
                    warnings.warn(f"skipping a clip of {path}: {e}")

    def __len__(self) -> int:
        return sum(math.ceil((n - 1) / self.frame_gap) // self.num_frames for _, n in self.videos)

    def _resize(self, frames: Iterable[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 frames -> (T, 3, size, size) float in [0, 1], or with `crop`, (T, 3, h, w) scaled to
        `size` on the short side, aspect kept (the crop is taken per sample)."""
        out = []
        for frame in frames:
            x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
            # squash: aspect not kept (CorrFlow); crop: the short side at `size`, so a 128 crop of a 256-scale
            # frame shows objects at the size CorrFlow trains at. Antialias so that downscaling does not alias
            hw = (self.size, self.size)
            if self.crop:
                s = self.size / min(x.shape[-2:])
                hw = tuple(max(self.size, round(n * s)) for n in x.shape[-2:])
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
            out.append(x[0])
        return torch.stack(out).clamp(0, 1) if out else torch.empty(0, 3, self.size, self.size)

    def load_clip(self, path: Path, start: int) -> torch.Tensor:
        """Frames start, start + gap, ... resized to size x size -> (T, 3, size, size) float in [0, 1]."""
        indices = range(start, start + self.span, self.frame_gap)
        if self.frames is not None:
            if path not in self.frames:
                raise VideoError(f"{path} could not be decoded into memory")
            clip = self.frames[path][indices.start:indices.stop:indices.step].float() / 255
        else:
            clip = self._resize(read_frames(path, indices))  # decodes up to the last needed frame only
        if len(clip) < self.num_frames:
            raise VideoError(f"{path} ended before frame {indices[-1]}: it has fewer frames than its container says")
        return clip

    def __getitem__(self, n: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(n))
        for _ in range(10):
            if self.sampling == "clips":
                k = int(torch.randint(0, int(self._ends[-1]), (), generator=g))  # one of all clip starts
                v = int(np.searchsorted(self._ends, k, side="right"))
                start = k - (int(self._ends[v - 1]) if v else 0)
            else:  # a video, then one of its clip starts: a few long videos cannot take most of the samples
                v = int(torch.randint(0, len(self.videos), (), generator=g))
                start = int(torch.randint(0, self.videos[v][1] - self.span + 1, (), generator=g))
            path = self.videos[v][0]
            if path in self._grey:
                continue
            try:
                clean = self.load_clip(path, start)
            except VideoError as e:
                # a video corrupt in the middle must not stop a long run: warn once, train on another clip
                if path not in self._failed:
                    self._failed.add(path)
                    warnings.warn(f"skipping a clip of {path}: {e}")
                continue
            if (clean.amax(1) - clean.amin(1)).mean() < GREY_SPREAD:  # one colour class: no gradient to learn from
                self._grey.add(path)
                warnings.warn(f"skipping {path}: no colour (black and white), nothing to colourise")
                continue
            if self.crop:  # one window for all frames of the clip
                h, w = clean.shape[-2:]
                side = self.crop
                if self.min_scale < 1:  # zoom out by s: a window of crop / s pixels shrunk to crop x crop
                    s = self.min_scale + (1 - self.min_scale) * float(torch.rand((), generator=g))
                    side = min(h, w, round(self.crop / s))
                top = int(torch.randint(0, h - side + 1, (), generator=g))
                left = int(torch.randint(0, w - side + 1, (), generator=g))
                clean = clean[..., top:top + side, left:left + side]
                if side != self.crop:
                    clean = F.interpolate(clean, size=(self.crop, self.crop), mode="bilinear", align_corners=False,
                                          antialias=True).clamp(0, 1)
                clean = clean.contiguous()
            jitter = float(torch.rand((), generator=g)) < self.jitter_p  # one coin per sample, factors per frame
            frames = colour_jitter(clean, generator=g) if jitter else clean.clone()
            return {"frames": frames, "clean": clean}
        raise RuntimeError(f"10 clips in a row failed to decode under {self.root}; see the warnings")


class RunBatches(torch.utils.data.Sampler):
    """Batches of sample numbers for the steps `start_step` .. `total_steps` - 1 of a run (a batch sampler for
    ClipDataset). Step s holds the global samples offset + s * batch_size * world ... ; under torchrun, process
    `rank` takes its slice of each global batch."""

    def __init__(self, batch_size: int, start_step: int, total_steps: int, rank: int = 0, world: int = 1,
                 offset: int = 0):
        self.b, self.start, self.total, self.rank, self.world = batch_size, start_step, total_steps, rank, world
        self.offset = offset  # samples of the runs this one continues: its stream starts after theirs

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            first = self.offset + (step * self.world + self.rank) * self.b
            yield list(range(first, first + self.b))


# -----------------------------------------------------------------------------
# the 16-colour quantiser of the targets
def fit_centroids(videos: Union[ClipDataset, str, Path, Sequence], n_clusters: int = 16, n_frames: int = 256,
                  pixels_per_frame: int = 1024, seed: int = 0, n_init: int = 2) -> torch.Tensor:
    """k-means on the (a, b) of pixels sampled from training frames -> centroids (n_clusters, 2) float32.

    `videos`: a ClipDataset, a root folder, or a list of video paths. About `n_frames` frames are sampled in all:
    a few from every video when there are fewer videos than that, else one from each of `n_frames` random videos,
    so the cost does not grow with the size of the training set. Unreadable videos are skipped with a warning."""
    from sklearn.cluster import KMeans  # imported here: only this function needs scikit-learn

    if isinstance(videos, ClipDataset):
        items = list(videos.videos)
    else:
        items = [(Path(p), None) for p in (find_videos(videos) if isinstance(videos, (str, Path)) else videos)]
    g = torch.Generator().manual_seed(seed)
    if len(items) > n_frames:
        items = [items[i] for i in sorted(torch.randperm(len(items), generator=g)[:n_frames].tolist())]
    per_video = -(-n_frames // max(len(items), 1))  # ceil
    samples = []  # [(P, 2)] a, b of sampled pixels
    for path, n in items:
        try:
            n = n or count_frames(path)
            indices = torch.randperm(n, generator=g)[:per_video].tolist()
            for frame in read_frames(path, indices):
                pixels = torch.from_numpy(frame.reshape(-1, 3))  # (H*W, 3) uint8
                pick = torch.randint(0, len(pixels), (pixels_per_frame,), generator=g)
                rgb = pixels[pick].float().div(255).T[:, :, None]  # (3, P, 1): an image of P x 1 pixels
                samples.append(rgb_to_lab(rgb)[1:, :, 0].T)  # (P, 2)
        except VideoError as e:
            warnings.warn(f"fit_centroids: skipping {path}: {e}")
    if not samples or sum(len(s) for s in samples) < n_clusters:
        raise ValueError(f"fit_centroids: not enough pixels from {len(items)} videos to fit {n_clusters} clusters")
    ab = torch.cat(samples).numpy()  # (N, 2) float32: k-means runs in float32, about twice as fast
    kmeans = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(ab)
    return torch.from_numpy(kmeans.cluster_centers_).float()


def quantise(rgb: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) or (3, H, W) -> index of the nearest centroid in (a, b), (B, H, W) or (H, W) long.
    centroids: (K, 2) as fitted by `fit_centroids`."""
    ab = rgb_to_lab(rgb.float())[..., 1:, :, :]  # (..., 2, H, W)
    c = centroids.to(ab)  # (K, 2)
    # |ab - c|^2 = |ab|^2 - 2 ab.c + |c|^2; |ab|^2 is the same for every centroid, so it is left out
    dist = (c * c).sum(1)[:, None, None] - 2 * torch.einsum("kc,...chw->...khw", c, ab)  # (..., K, H, W)
    return dist.argmin(dim=-3)
