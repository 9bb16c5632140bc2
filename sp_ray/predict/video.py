"""Video decode and encode with PyAV (FFmpeg): the frame list of a video, the frames of one shard, an
annotated segment per shard, and the segments joined into one video (numpy + av only).

A video is cut into shards of consecutive frames. Frames are identified by their presentation
timestamp (pts), listed once on the driver by demuxing the packets without decoding them, so that
an actor can seek to its shard's first frame and decode only its own frames. Each shard's annotated
frames are encoded into a segment at the input's average frame rate; joining the segments copies
their packets (no second encoding) with their timestamps shifted, so the annotated video has one
frame per input frame at the same rate.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# FFmpeg's own MPEG-4 Part 2 encoder: in every FFmpeg build (libx264 is not in PyAV's wheels everywhere),
# deterministic, and played by common players from an .mp4.
CODEC = "mpeg4"
# Bits per pixel per frame of the segments: high enough that drawn outlines and text stay legible.
BITS_PER_PIXEL = 0.6


@dataclass(frozen=True)
class VideoInfo:
    """What the driver reads of a video before predicting.

    Attributes:
        frame_pts: presentation timestamps of the frames in display order, in the stream's time base.
        fps: average frame rate (frames per second).
        width: frame width in pixels.
        height: frame height in pixels.
    """

    frame_pts: list[int]
    fps: Fraction
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """List the frames of the first video stream without decoding them.

    Raises:
        ValueError: the file has no video stream, no frames or no frame rate; av.FFmpegError (an
            OSError) or ValueError: it is not a video FFmpeg reads.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        if not fps:
            raise ValueError(f"{path}: the video stream has no frame rate")
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
        if not pts:
            raise ValueError(f"{path}: the video stream holds no frames")
        return VideoInfo(frame_pts=pts, fps=Fraction(fps), width=stream.codec_context.width,
                         height=stream.codec_context.height)


def read_frames(path: str | os.PathLike, frame_pts: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the frames whose pts are listed (consecutive frames of one shard).

    Args:
        path: the video.
        frame_pts: pts of the wanted frames, ascending.

    Yields:
        (pts, uint8 [H, W, 3] RGB) of each wanted frame that decodes, in display order.
    """
    wanted = set(frame_pts)
    first, last = frame_pts[0], frame_pts[-1]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Seek lands on the key frame at or before the first wanted frame; decoding goes on from there.
        container.seek(first, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts < first:
                continue
            if frame.pts in wanted:
                yield frame.pts, frame.to_ndarray(format="rgb24")
            if frame.pts >= last:
                break


def _even(image: np.ndarray) -> np.ndarray:
    """Pad the bottom row / right column by repetition to even sides (yuv420p has 2 x 2 chroma)."""
    height, width = image.shape[:2]
    return np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


class SegmentEncoder:
    """Encodes frames, as they come, into an MP4 segment in memory.

    Args:
        fps: frame rate of the segment; frame i gets pts i in 1/fps units.
    """

    def __init__(self, fps: Fraction) -> None:
        self.fps = fps
        self.frames = 0
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._stream = None

    def add(self, pixels: np.ndarray) -> None:
        """Append one uint8 [H, W, 3] RGB frame (every frame of the size of the first; odd sides padded)."""
        pixels = _even(pixels)
        if self._stream is None:
            self._stream = self._container.add_stream(CODEC, rate=self.fps)
            self._stream.height, self._stream.width = pixels.shape[:2]
            self._stream.pix_fmt = "yuv420p"
            self._stream.bit_rate = int(BITS_PER_PIXEL * pixels.shape[0] * pixels.shape[1] * float(self.fps))
            self._stream.codec_context.time_base = 1 / self.fps
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        frame.pts = self.frames
        frame.time_base = 1 / self.fps
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def finish(self) -> bytes:
        """Flush the encoder and return the MP4 bytes (empty when no frame was added)."""
        if self._stream is None:
            self._container.close()
            return b""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._buffer.getvalue()


def join_segments(segments: list[Path], out: Path, fps: Fraction) -> int:
    """Join MP4 segments of ``SegmentEncoder`` into one video by copying their packets.

    Args:
        segments: the segment files, in order.
        out: the video to write (written beside, then renamed).
        fps: their frame rate.

    Returns:
        The number of frames written.
    """
    tmp = out.with_name(f".{out.stem}.{os.getpid()}{out.suffix}")
    frames = 0
    with av.open(str(segments[0])) as first, av.open(str(tmp), mode="w") as output:
        target = output.add_stream_from_template(first.streams.video[0])
        for path in segments:
            with av.open(str(path)) as part:
                source = part.streams.video[0]
                # The frames before this segment, in the segment's time base.
                offset = round(frames / fps / source.time_base)
                count = 0
                for packet in part.demux(source):
                    if packet.dts is None:  # the demuxer's empty flush packet
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = target
                    output.mux(packet)
                    count += 1
                frames += count
    os.replace(tmp, out)
    return frames


def count_frames(path: str | os.PathLike) -> tuple[int, Fraction]:
    """(decoded frames, average frame rate) of a video's first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), Fraction(stream.average_rate)
