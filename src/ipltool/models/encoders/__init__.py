"""Image encoders for real-face inversion: pSp, e4e, ReStyle-pSp, ReStyle-e4e.

The four plugins (`E4E`, `PSP`, `RESTYLE_E4E`, `RESTYLE_PSP`) are the targets of the
`ipltool.encoders` entry points; each loads an official checkpoint (`load`) or builds a
tiny random copy (`tiny`) and returns an `Inverter`:

    inverter = ipltool.registry.load("encoders", "restyle-e4e").load(path, device="cuda")
    codes = inverter.invert(inverter.preprocess(images))     # (B, 18, 512)
"""

from ipltool.models.encoders.checkpoint import EncoderCheckpoint, encoder_arch, read_checkpoint, save_checkpoint
from ipltool.models.encoders.inverter import (
    DEFAULT_STEPS,
    E4E,
    PLUGINS,
    PSP,
    RESTYLE_E4E,
    RESTYLE_PSP,
    EncoderPlugin,
    Inverter,
    ReStyleInverter,
    SinglePassInverter,
)
from ipltool.models.encoders.irse import BackboneConfig, BottleneckIRSE, GradualStyleBlock, SEModule
from ipltool.models.encoders.psp import (
    ENCODER_CLASSES,
    BackboneEncoder,
    Encoder4Editing,
    GradualStyleEncoder,
    ProgressiveBackboneEncoder,
    n_styles_for,
)

__all__ = [
    "BackboneConfig",
    "BackboneEncoder",
    "BottleneckIRSE",
    "DEFAULT_STEPS",
    "E4E",
    "ENCODER_CLASSES",
    "Encoder4Editing",
    "EncoderCheckpoint",
    "EncoderPlugin",
    "GradualStyleBlock",
    "GradualStyleEncoder",
    "Inverter",
    "PLUGINS",
    "PSP",
    "ProgressiveBackboneEncoder",
    "RESTYLE_E4E",
    "RESTYLE_PSP",
    "ReStyleInverter",
    "SEModule",
    "SinglePassInverter",
    "encoder_arch",
    "n_styles_for",
    "read_checkpoint",
    "save_checkpoint",
]
