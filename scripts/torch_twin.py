"""The same ResNet in plain torch.nn (eager), for side-by-side timings with the JAX step.

Used by benchmark.py (`--compare-torch`) and gpu_report.py (the CIFAR nets torchvision lacks).
torch is imported by the caller and passed in, so importing this module does not need it.
"""

from __future__ import annotations

import time

import numpy as np

from resnet_jax.models import parse_name


class TorchBench:
  """The same ResNet in plain torch.nn, eager mode, same batch/optimizer/BN momentum."""

  def __init__(self, args, images, labels, num_classes):
    import torch  # pylint: disable=g-import-not-at-top

    self.torch = torch
    spec = parse_name(args.model)
    self.model = torch_resnet(torch, spec, num_classes)
    if args.torch_channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    self.loss = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.x = x.contiguous(memory_format=torch.channels_last) if args.torch_channels_last else x
    self.y = torch.from_numpy(labels.astype(np.int64))
    self.autocast = args.dtype == 'bfloat16'
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    self.num_threads = torch.get_num_threads()
    self.version = torch.__version__

  def _step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
      out = self.model(self.x)
    loss = self.loss(out.float(), self.y)
    loss.backward()
    self.opt.step()
    return loss

  def train_steps(self, k: int) -> list[float]:
    self.model.train()
    times = []
    for _ in range(k):
      t = time.perf_counter()
      self._step().item()  # the metric the loop would fetch; also a sync point
      times.append(time.perf_counter() - t)
    return times

  def eval_steps(self, k: int) -> list[float]:
    torch = self.torch
    self.model.eval()
    times = []
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
      for _ in range(k):
        t = time.perf_counter()
        self.model(self.x).float().argmax(-1).sum().item()
        times.append(time.perf_counter() - t)
    return times


def torch_resnet(torch, spec, num_classes):
  """torchvision-equivalent ResNet (v1.5, shortcut B) or the CIFAR ResNet (shortcut A)."""
  nn, F = torch.nn, torch.nn.functional
  residual = spec.residual

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # flax momentum 0.9 == torch 0.1

  class ShortcutA(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))

  def shortcut(kind, cin, cout, stride):
    if not residual:
      return None
    if stride == 1 and cin == cout:
      return nn.Identity()
    if kind == 'A':
      return ShortcutA(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

  class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, kind):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.bn1 = bn(width)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.bn2 = bn(width)
      self.short = shortcut(kind, cin, width, stride)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)), inplace=True)
      y = self.bn2(self.conv2(y))
      if self.short is not None:
        y = y + self.short(x)
      return F.relu(y, inplace=True)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, kind):
      super().__init__()
      out = width * 4
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.bn1 = bn(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
      self.bn2 = bn(width)
      self.conv3 = nn.Conv2d(width, out, 1, bias=False)
      self.bn3 = bn(out)
      self.short = shortcut(kind, cin, out, stride)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)), inplace=True)
      y = F.relu(self.bn2(self.conv2(y)), inplace=True)
      y = self.bn3(self.conv3(y))
      if self.short is not None:
        y = y + self.short(x)
      return F.relu(y, inplace=True)

  if spec.family == 'imagenet':
    from resnet_jax.models.resnet import IMAGENET_DEPTHS, IMAGENET_WIDTHS  # pylint: disable=g-import-not-at-top

    kind, sizes = IMAGENET_DEPTHS[spec.depth]
    block, widths, sc = (Basic if kind == 'basic' else Bottleneck), IMAGENET_WIDTHS, 'B'
    stem = [
      nn.Conv2d(3, 64, 7, 2, 3, bias=False),
      bn(64),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2, 1),
    ]
  else:
    block, widths, sc = Basic, (16, 32, 64), 'A'
    sizes = ((spec.depth - 2) // 6,) * 3
    stem = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), bn(16), nn.ReLU(inplace=True)]
  layers, cin = list(stem), widths[0]
  for i, (n, w) in enumerate(zip(sizes, widths)):
    for j in range(n):
      layers.append(block(cin, w, 2 if i > 0 and j == 0 else 1, sc))
      cin = w * block.expansion
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  model = nn.Sequential(*layers)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
  return model
