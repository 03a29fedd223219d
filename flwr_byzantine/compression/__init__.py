"""Gradient compression (pure numpy): randk with a server-broadcast coordinate set."""

from .randk import RANDK_PROCEDURE, RandK, coordinate_digest, draw_coordinates, randk_compress, scatter

__all__ = ["RANDK_PROCEDURE", "RandK", "coordinate_digest", "draw_coordinates", "randk_compress", "scatter"]
