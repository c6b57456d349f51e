"""Landmarks: landmarks.txt I/O, distance-map encodings and the hip-joint detector."""

from landmark_unet.landmarks.distance import distance_map

__all__ = ["distance_map"]
