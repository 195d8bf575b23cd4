"""Commands the README and docs/results.md print or tell the user to run, as a new user meets
them."""

import re

import pytest

from resnet_jax import convert
from resnet_jax.default_config import load_sibling_config


def _config(name: str):
  return load_sibling_config('configs/x.py', name)


@pytest.mark.parametrize('in_channels', [1, 3])
def test_convert_prints_a_finetune_command_whose_dataset_fits_the_stem(
  torch, random_torchvision, tmp_path, capsys, in_channels
):
  """convert printed `finetune.py:arch=A` for RGB weights too: its default dataset, digits, is
  grayscale, so the printed command stopped with 'params/conv1/kernel has shape (7, 7, 3, 64),
  model wants (7, 7, 1, 64)'."""
  weights = tmp_path / 'r18.pth'
  torch.save(random_torchvision('resnet18').state_dict(), weights)
  args = ['--arch', 'resnet18', '--torchvision-weights', str(weights), '--out', str(tmp_path / 'c')]
  convert.main(args + ['--in-channels', str(in_channels)])
  hint = [x for x in capsys.readouterr().out.splitlines() if x.startswith('fine-tune:')]
  assert len(hint) == 1, hint
  config_arg = re.search(r'--config=configs/finetune\.py:(\S+)', hint[0]).group(1)
  config = _config('finetune').get_config(config_arg)
  assert config.model.name == 'resnet18'
  assert (config.data.name == 'digits') == (in_channels == 1), hint[0]


def test_paper_registry_refuses_an_unknown_experiment_in_one_line(capsys):
  """`python configs/paper.py tabel6` ended in a ValueError traceback."""
  paper = _config('paper')
  assert paper.main(['tabel6']) == 1
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.startswith("error: unknown experiment 'tabel6'; known: table6,")
  assert len(captured.err.splitlines()) == 1
  assert paper.main(['table6']) == 0
  assert '--depths=20,32,44,56,110' in capsys.readouterr().out


def test_prepare_help_says_any_tfds_name_is_taken():
  """`prepare --help` said NAME is 'one of: cifar10, ..., digits' while any other TFDS name is
  prepared too (README: 'or any other TFDS name')."""
  from resnet_jax.data import prepare

  help_text = ' '.join(prepare._parser().format_help().split())
  assert 'one of:' not in help_text
  assert 'cifar10, cifar100, fashion_mnist, imagenet2012, imagenette, digits, or any other' in (
    help_text
  )
