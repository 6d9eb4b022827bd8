"""Video in, video out, routed frame by frame, with a per-frame report.

Frames are decoded and encoded with PyAV (FFmpeg's libraries, shipped in its wheels): the
output keeps the input's frame count, size, frame rate and display rotation (a phone's
portrait clip stays portrait); MP4 is written with H.264 (CRF 18, 4:2:0, or 4:4:4 when a
side is odd), WebM with VP9, 8 bits per sample, at a constant frame rate (the input's
average: a variable-rate input keeps its frames, not their timing). Each frame is routed on its
own, so a degradation that changes over time is followed; ``smooth`` (0 to <1) averages
the gates over time (exponential moving average) to avoid flicker when the router
hesitates between two classes. The report has one row per frame (detected class, its
probability, every gate, and PSNR against a reference video when one is given) and is
written as CSV with a plot of the gates (and PSNR) over time.
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraxir.errors import DataError
from loraxir.figures import save_figure
from loraxir.inference.restorer import Restorer, Routing
from loraxir.validation import make_parent_folder

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi"})
_ENCODERS = {".webm": ("libvpx-vp9", {"crf": "20", "b": "0"})}
_DEFAULT_ENCODER = ("libx264", {"crf": "18", "preset": "medium"})


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says."""

    frames: int
    width: int
    height: int
    fps: Fraction
    rotation: int = 0


def _ffmpeg_path(path: str | Path) -> str:
    """``path`` made absolute for FFmpeg, which reads ``12:00.mp4`` as a ``12:`` protocol."""
    return os.path.abspath(path)


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, size, frame rate and display rotation (degrees counter-clockwise) of
    the first video stream; the count by decoding when the container does not store it."""
    av = _av()
    try:
        with av.open(_ffmpeg_path(path)) as container:
            if not container.streams.video:
                raise DataError(f"{str(path)!r} holds no video stream.")
            stream = container.streams.video[0]
            decoded = container.decode(stream)
            first = next(decoded, None)
            rotation = first.rotation if first is not None else 0
            frames = stream.frames or (first is not None) + sum(1 for _ in decoded)
            rate = stream.average_rate or stream.base_rate
            return VideoInfo(frames, stream.width, stream.height, Fraction(rate), rotation)
    except av.FFmpegError as error:
        raise DataError(f"Cannot read video {str(path)!r}: {error}.") from None


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Decode the first video stream as ``(H, W, 3)`` ``uint8`` RGB frames."""
    av = _av()
    try:
        with av.open(_ffmpeg_path(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
    except av.FFmpegError as error:
        raise DataError(f"Cannot decode video {str(path)!r}: {error}.") from None


class VideoWriter:
    """Encode ``(H, W, 3)`` ``uint8`` frames at a fixed frame rate (context manager);
    ``rotation`` (degrees counter-clockwise) is written as the display rotation. FFmpeg's
    errors are raised as :class:`DataError` naming the file."""

    def __init__(
        self, path: str | Path, width: int, height: int, fps: Fraction, rotation: int = 0
    ) -> None:
        av = _av()
        self._path = Path(path)
        if self._path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise DataError(
                f"Cannot write a video to {str(self._path)!r}: name it with a video suffix "
                f"({', '.join(sorted(VIDEO_EXTENSIONS))})."
            )
        if not fps > 0:
            raise DataError(f"A video needs a frame rate > 0, got {fps!r}.")
        make_parent_folder(self._path, DataError)
        codec, options = _ENCODERS.get(self._path.suffix.lower(), _DEFAULT_ENCODER)
        with self._errors():
            self._container = av.open(_ffmpeg_path(self._path), "w")
            stream = self._container.add_stream(codec, rate=fps, options=dict(options))
            stream.width, stream.height = width, height
            odd = width % 2 or height % 2
            stream.pix_fmt = "yuv444p" if odd and codec == "libx264" else "yuv420p"
            if rotation:
                stream.set_display_rotation(rotation)
        self._stream = stream
        # The frames' own clock: the muxer may change the stream's time base when it writes
        # its header (MP4: 1/12288 for 24 fps), after the encoder has taken frames.
        self._time_base = 1 / Fraction(fps)
        self._index = 0
        self._size = (height, width)

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame; a frame of another size than the stream's raises
        :class:`DataError` (the encoder would rescale it without a word)."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3:
            raise DataError(
                f"Video frames are (H, W, 3) uint8 arrays, got "
                f"{getattr(frame, 'dtype', type(frame).__name__)} of shape "
                f"{getattr(frame, 'shape', None)}; convert float frames with "
                "(frame * 255).round().astype(np.uint8)."
            )
        if frame.shape[:2] != self._size:
            raise DataError(
                f"Frame {self._index} of {str(self._path)!r} is {frame.shape[1]}x"
                f"{frame.shape[0]}, the video's first frames {self._size[1]}x{self._size[0]}: "
                "videos whose frames change size are not restored. Split it where the size "
                "changes (e.g. with ffmpeg) and restore the parts."
            )
        av = _av()
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self._index
        video_frame.time_base = self._time_base
        self._index += 1
        with self._errors():
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)

    def close(self) -> None:
        with self._errors():
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        av = _av()
        try:
            yield
        except av.FFmpegError as error:
            raise DataError(f"Cannot encode video {str(self._path)!r}: {error}.") from None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # an error or Ctrl-C: close the file without flushing the encoder
            with contextlib.suppress(Exception):
                self._container.close()


@dataclass
class FrameReport:
    """One row per frame: what the router saw and, given a reference, the PSNR."""

    degradations: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, routing: Routing, psnr: float | None, psnr_input: float | None) -> None:
        row: dict[str, Any] = {
            "frame": len(self.rows),
            "detected": routing.label,
            "confidence": round(routing.confidence, 4),
            "unsure": routing.unsure,
        }
        row |= {
            f"gate_{n}": round(float(g), 4)
            for n, g in zip(self.degradations, routing.gates, strict=True)
        }
        if psnr is not None:
            row |= {"psnr": round(psnr, 3), "psnr_input": round(psnr_input, 3)}
        self.rows.append(row)

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Gates per class over time (top) and, with a reference, PSNR (bottom)."""
        from matplotlib.figure import Figure  # not pyplot: the caller's backend stays

        has_psnr = "psnr" in self.rows[0]
        fig = Figure(figsize=(8, 5 if has_psnr else 3))
        axes = fig.subplots(2 if has_psnr else 1, 1, sharex=True, squeeze=False)
        frames = [row["frame"] for row in self.rows]
        for name in self.degradations:
            axes[0, 0].plot(frames, [row[f"gate_{name}"] for row in self.rows], label=name)
        axes[0, 0].set_ylabel("gate")
        axes[0, 0].set_ylim(-0.05, 1.05)
        axes[0, 0].legend(loc="upper right", fontsize="small")
        axes[0, 0].set_title(title or "experts chosen per frame", parse_math=False)  # names hold $
        if has_psnr:
            axes[1, 0].plot(frames, [row["psnr_input"] for row in self.rows], label="input")
            axes[1, 0].plot(frames, [row["psnr"] for row in self.rows], label="restored")
            axes[1, 0].set_ylabel("PSNR (dB)")
            axes[1, 0].legend(loc="lower right", fontsize="small")
        axes[-1, 0].set_xlabel("frame")
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


def restore_video(
    restorer: Restorer,
    source: str | Path,
    target: str | Path,
    smooth: float = 0.0,
    reference: str | Path | None = None,
    on_frame: Callable[[Routing], None] | None = None,
) -> FrameReport:
    """Restore every frame of ``source`` into ``target``; returns the per-frame report.

    ``reference`` is a clean video of the same frames (PSNR per frame in the report); its
    frame count and size are checked before any frame is restored.
    """
    if isinstance(smooth, bool) or not isinstance(smooth, numbers.Real) or not 0.0 <= smooth < 1.0:
        raise DataError(f"--smooth must be in [0, 1), got {smooth!r}.")
    if Path(target).resolve() == Path(source).resolve():
        raise DataError(
            f"The output {str(target)!r} is the input video: restoring it there would "
            "replace the original. Choose another output path."
        )
    info = probe_video(source)
    if info.frames == 0:
        raise DataError(f"{str(source)!r} holds no video frame.")
    if reference is not None:
        clean = probe_video(reference)
        if (clean.frames, clean.width, clean.height) != (info.frames, info.width, info.height):
            raise DataError(
                f"Reference {str(reference)!r} has {clean.frames} frames of "
                f"{clean.width}x{clean.height}, {str(source)!r} {info.frames} of "
                f"{info.width}x{info.height}: a reference must be the same frames, clean."
            )
    report = FrameReport(restorer.degradations)
    references = read_frames(reference) if reference is not None else None
    previous = None
    with VideoWriter(target, info.width, info.height, info.fps, info.rotation) as writer:
        for frame in read_frames(source):
            routing = restorer.route(frame).smoothed(previous, smooth)
            restored, _ = restorer.restore(frame, routing)
            writer.write(restored)
            psnr = psnr_input = None
            if references is not None:
                clean = next(references, None)
                if clean is None or clean.shape != frame.shape:
                    raise DataError(
                        f"Reference {str(reference)!r} has fewer frames or another size than "
                        f"{str(source)!r}."
                    )
                psnr, psnr_input = _psnr(restored, clean), _psnr(frame, clean)
            report.add(routing, psnr, psnr_input)
            previous = routing
            if on_frame is not None:
                on_frame(routing)
    return report


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    from loraxir.metrics import psnr

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).double() / 255

    value = float(psnr(tensor(image), tensor(reference))[0])
    return value if math.isfinite(value) else 100.0


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise DataError(
            "Video needs PyAV: pip install 'av>=18.1,<19' (FFmpeg's libraries ship in its wheels)."
        ) from None
    return av
