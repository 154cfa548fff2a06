"""Model zoo: every architecture by name, sized from the data set's input shape and classes.

FedMe's candidate families (the paper's four depths each): ``cnn1``-``cnn4`` (FEMNIST-style, with
a ReLU between convolutions, unlike the authors' code), ``vgg11``-``vgg19`` (no BatchNorm, as in
the paper) and ``lstm1``-``lstm4`` (next-character prediction). The asynchronous distillation
scheme's distilled (small) and global (large) models: ``cnn-distill6`` / ``cnn-global12``, the
paper's depths (6 and 12 weight layers: 4 and 10 convolutions, each followed by 2 linear layers),
and the earlier, shallower ``cnn-small`` / ``cnn-large``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

InputShape = tuple[int, ...]


class ConvNet(nn.Module):
    """3x3 conv + ReLU blocks; 2x2 max-pooling after the first convs while the map is >= 8 wide.

    The map is then pooled to a size fixed by the input (a quarter of its width, or ``side``),
    so the classifier's input does not shrink with depth and deeper models are strictly larger.
    """

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        channels: Sequence[int],
        hidden: int = 128,
        max_pools: int = 2,
        side: int | None = None,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        pools = 0
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if pools < max_pools and min(height, width) >= 8:
                layers.append(nn.MaxPool2d(2))
                height, width, pools = height // 2, width // 2, pools + 1
            in_channels = out_channels
        side = side or max(1, min(input_shape[1:]) // 4)
        layers.append(nn.AdaptiveMaxPool2d(side))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG without BatchNorm; pools are skipped once the map is 1x1."""

    def __init__(self, input_shape: InputShape, num_classes: int, layout: list[int | str]):
        super().__init__()
        in_channels, height, _ = input_shape
        layers: list[nn.Module] = []
        for item in layout:
            if item == "M":
                if height >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height //= 2
                continue
            layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(item)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CharLSTM(nn.Module):
    """Embedding -> stacked LSTM -> linear over the vocabulary, from the last time step."""

    def __init__(self, vocab_size: int, num_layers: int, embed: int = 8, hidden: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.embedding(x))
        return self.head(output[:, -1, :])


ModelBuilder = Callable[[InputShape, int], nn.Module]

CNN_CHANNELS = {1: [32], 2: [32, 64], 3: [32, 64, 64], 4: [32, 64, 64, 128]}

MODELS: dict[str, ModelBuilder] = {
    **{
        f"cnn{depth}": (lambda shape, classes, c=channels: ConvNet(shape, classes, c))
        for depth, channels in CNN_CHANNELS.items()
    },
    **{
        name: (lambda shape, classes, layout=layout: VGG(shape, classes, layout))
        for name, layout in VGG_LAYOUTS.items()
    },
    **{
        f"lstm{depth}": (lambda shape, classes, d=depth: CharLSTM(classes, d))
        for depth in range(1, 5)
    },
    "cnn-small": lambda shape, classes: ConvNet(shape, classes, [16, 32], hidden=64),
    "cnn-large": lambda shape, classes: ConvNet(
        shape, classes, [64, 64, 128, 128, 256, 256], hidden=256
    ),
    # The paper's depths. Three pools bring 32x32 down to 4x4 early, which keeps a 10-conv
    # model affordable on a CPU; a 2x2 map into the classifier keeps its first layer small.
    "cnn-distill6": lambda shape, classes: ConvNet(
        shape, classes, [16, 32, 64, 64], hidden=64, max_pools=3, side=2
    ),
    "cnn-global12": lambda shape, classes: ConvNet(
        shape, classes, [32, 32, 64, 64, 64, 64, 128, 128, 128, 128], hidden=256, max_pools=3,
        side=2,
    ),
}

SEQUENCE_MODELS = frozenset(name for name in MODELS if name.startswith("lstm"))


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    """The one constructor every part of fedapps uses, so names mean the same everywhere."""
    if name not in MODELS:
        raise ValueError(f"model '{name}' is not known; allowed: {', '.join(MODELS)}")
    is_sequence = len(input_shape) == 1
    if is_sequence != (name in SEQUENCE_MODELS):
        kind = "token sequences" if is_sequence else "images"
        raise ValueError(
            f"model '{name}' does not fit this data set's inputs ({kind} of shape "
            f"{input_shape}); use {'lstm1-4' if is_sequence else 'a cnn or vgg'} models"
        )
    return MODELS[name](input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
