"""landmark_unet: U-Nets with anatomical-landmark distance maps for organ segmentation in whole-body Dixon MRI."""

from landmark_unet.config import register_resolvers

register_resolvers()  # the configs' ${organs:...}, ${channels:...}, ${len:...}, ${map_channels:...}

__version__ = "0.1.0"
