"""Merlin's image encoder: an I3D (inflated 3-D) ResNet-152, re-implemented module for module.

Re-implemented from the published source of the Merlin model (Blankemeier et al. 2024,
`merlin/models/i3res.py`, `inflate.py` and `build.py` of github.com/StanfordMIMI/Merlin, the
code shipped as the `merlin-vlm` package) so that its checkpoint loads with `strict=True` without
installing `merlin-vlm` (which pins another torch). Module names and shapes match
`MerlinArchitecture.encode_image` (`ImageEncoder.i3_resnet`):

- `conv1`: Conv3d(3, 64, (3, 7, 7), stride (1, 2, 2), padding (1, 3, 3), no bias); `bn1`; `relu`;
  `maxpool`: MaxPool3d(3, stride 2, padding 1);
- `layer1..layer4`: ResNet-152 bottlenecks (3, 8, 36, 3 blocks; widths 64, 128, 256, 512;
  expansion 4), each with `conv1` (1x1x1), `conv2` (3x3x3, stride s in all three axes),
  `conv3` (1x1x1), `bn1..bn3`, and `downsample` = (Conv3d 1x1x1 stride s, BatchNorm) on the
  first block of a stage;
- `avgpool` (global), `classifier` Conv3d(2048, 1692, 1) (phenotype head),
  `contrastive_head` Conv3d(2048, 512, 1).

Input [B, 1, X, Y, Z] (RAS, 1.5 x 1.5 x 3 mm, HU -1000..1000 -> [0, 1], 224 x 224 x 160);
Merlin permutes it to [B, 1, Z, X, Y] and repeats the channel 3 times. `features()` returns the
layer4 map [B, 2048, Z', X', Y'] whose global average is Merlin's 2048-d image embedding.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck3d", "I3ResNet", "MerlinImageEncoder"]

RESNET152_BLOCKS = (3, 8, 36, 3)
N_PHENOTYPES = 1692  # Merlin's phenotype classifier outputs


class Bottleneck3d(nn.Module):
    """Inflated ResNet bottleneck (conv1 1x1x1 -> conv2 3x3x3 stride s -> conv3 1x1x1) + skip."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out)
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + residual)


class I3ResNet(nn.Module):
    """The I3D ResNet trunk + Merlin's two 1x1x1 heads (`conv_class=True` variant)."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = RESNET152_BLOCKS,
        class_nb: int = N_PHENOTYPES,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_planes = 64
        layers = []
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(Bottleneck3d(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * Bottleneck3d.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.classifier = nn.Conv3d(2048, class_nb, 1, bias=True)
        self.contrastive_head = nn.Conv3d(2048, 512, 1, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, X, Y, Z] -> layer4 map [B, 2048, Z', X', Y'] (Merlin's axis order)."""
        x = x.permute(0, 1, 4, 2, 3)
        x = torch.cat((x, x, x), dim=1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive [B, 512], phenotype logits [B, class_nb]) as in Merlin."""
        f = self.avgpool(self.features(x))
        contrastive = self.contrastive_head(f).flatten(2).mean(2)
        ehr = self.classifier(f).flatten(2).mean(2)
        return contrastive, ehr


class MerlinImageEncoder(nn.Module):
    """`MerlinArchitecture.encode_image`: holds `i3_resnet`; `forward` gives the layer4 map."""

    def __init__(self, blocks: tuple[int, int, int, int] = RESNET152_BLOCKS) -> None:
        super().__init__()
        self.i3_resnet = I3ResNet(tuple(blocks))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.i3_resnet.features(x)
