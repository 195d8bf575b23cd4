"""What a researcher walking this session's features hit (the walk of 2026-11-25), one test each."""

import os

import pytest

from resnet_jax import convert, torch_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY_RESNET18 = os.path.join(FIXTURES, 'tiny_resnet18.pth')


def test_a_truncated_zip_pth_is_named_as_truncated_not_as_another_format(tmp_path):
  """An interrupted download of a current .pth keeps the zip's first entries but loses its
  central directory: it was refused as 'not a torch.save file (neither a zip archive nor a
  pickle)', which sends the user looking for the wrong cause."""
  with open(TINY_RESNET18, 'rb') as f:
    data = f.read()
  path = tmp_path / 'resnet18.pth'
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_checkpoint.CheckpointError, match='truncated or damaged zip') as e:
    torch_checkpoint.load(str(path))
  assert str(e.value).startswith(str(path))
  assert 'not a torch.save file' not in str(e.value)


def test_convert_of_a_truncated_pth_is_one_error_line(tmp_path, capsys):
  with open(TINY_RESNET18, 'rb') as f:
    data = f.read()
  path = tmp_path / 'resnet18.pth'
  path.write_bytes(data[:40_000])
  with pytest.raises(SystemExit) as e:
    convert.main(
      ['--arch', 'resnet18', '--torchvision-weights', str(path), '--out', str(tmp_path / 'out')]
    )
  assert e.value.code not in (0, None)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert 'truncated or damaged zip' in err[0], err
  assert not (tmp_path / 'out').exists()


def test_a_wrong_arch_is_a_short_line_that_names_the_files_blocks():
  """A resnet18 file converted with --arch resnet50 listed all 165 missing keys and 24 shape
  mismatches in one error line of about 10 KB, and never said the file is a resnet18."""
  sd = torch_checkpoint.load(TINY_RESNET18)
  with pytest.raises(ValueError) as e:
    convert.from_torchvision(sd, 'resnet50')
  message = str(e.value)
  assert len(message) < 2_000, len(message)
  assert '(165 in all)' in message and '(24 in all)' in message
  assert 'the file has basic blocks 2,2,2,2 per stage, resnet50 has bottleneck 3,4,6,3' in message
  # A file of the right blocks with one foreign key: named in full, no block hint.
  stem = {('conv1.0.weight' if k == 'conv1.weight' else k): v for k, v in sd.items()}
  with pytest.raises(ValueError) as e:
    convert.from_torchvision(stem, 'resnet18')
  assert str(e.value) == (
    "state_dict does not fit resnet18: missing torchvision keys ['conv1.weight']; "
    "unused torchvision keys ['conv1.0.weight']"
  )


@pytest.mark.parametrize(
  'content,needle',
  [
    (
      b'version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 102540417\n',
      'a Git LFS pointer, not the weights',
    ),
    (b'<!DOCTYPE html><html><body>Sign in</body></html>', 'an HTML or XML page'),
    (b'garbage', 'nor a safetensors file'),
  ],
)
def test_a_model_safetensors_that_is_not_weights_says_what_it_is(tmp_path, content, needle):
  """A `model.safetensors` cloned without git-lfs (a 130-byte pointer) or a download that
  returned a web page was refused as 'not a torch.save file (neither a zip archive nor a
  pickle)': wrong for a file named .safetensors, and silent about the usual cause."""
  path = tmp_path / 'model.safetensors'
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    convert.load_torch_state_dict(str(path))
  message = str(e.value)
  assert message.startswith(str(path)) and needle in message and '\n' not in message, message


def _imagenet_config(arg):
  import importlib.util  # pylint: disable=import-outside-toplevel

  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'imagenet.py')
  spec = importlib.util.spec_from_file_location('walk2_imagenet_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize(
  'arg,group',
  [
    ('', 32),
    ('bn_group=0', None),
    ('recipe=modern', None),
    ('recipe=torchvision', None),
    ('recipe=torchvision,bn_group=32', 32),
    ('recipe=modern,bn_group=16', 16),
  ],
)
def test_imagenet_bn_group_arg_works_with_every_recipe(arg, group):
  """imagenet.py's docstring lists `bn_group` among its args, but with recipe=modern or
  torchvision it was silently dropped (bn_group_size None: whole-batch statistics)."""
  assert _imagenet_config(arg).model.bn_group_size == group
