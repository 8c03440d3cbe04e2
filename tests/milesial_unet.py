"""milesial/Pytorch-UNet's ``UNet`` transcribed for the tests (its ``unet/unet_model.py`` and
``unet/unet_parts.py``: the same module names, types and forward, written from its description),
with the width as a parameter (64 there) to keep the tests small. The truth the milesial preset,
``from_milesial`` and ``accelerate`` are compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MDoubleConv(nn.Module):
    bias = False  # True: his DoubleConv before v3.0 (biased 3x3 convs)

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=self.bias),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=self.bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class MDown(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), MDoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class MUp(nn.Module):
    def __init__(self, in_channels, out_channels, bilinear=True):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = MDoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = MDoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class MOutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class MilesialUNet(nn.Module):
    def __init__(self, n_channels, n_classes, bilinear=False, base=64):
        super().__init__()
        self.n_channels, self.n_classes, self.bilinear = n_channels, n_classes, bilinear
        b = base
        self.inc = MDoubleConv(n_channels, b)
        self.down1 = MDown(b, 2 * b)
        self.down2 = MDown(2 * b, 4 * b)
        self.down3 = MDown(4 * b, 8 * b)
        factor = 2 if bilinear else 1
        self.down4 = MDown(8 * b, 16 * b // factor)
        self.up1 = MUp(16 * b, 8 * b // factor, bilinear)
        self.up2 = MUp(8 * b, 4 * b // factor, bilinear)
        self.up3 = MUp(4 * b, 2 * b // factor, bilinear)
        self.up4 = MUp(2 * b, b, bilinear)
        self.outc = MOutConv(b, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
