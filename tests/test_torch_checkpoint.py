"""resnet_jax.torch_checkpoint: torch.save files read without torch, and never run.

The committed fixtures were written by torch itself (`tests/fixtures/make_torch_golden.py`); the
hand-made pickles below are what a crafted or damaged file would hold, built opcode by opcode
so that no torch is needed to make them.
"""

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

from resnet_jax import convert, pretrained, torch_checkpoint
from tests.fixtures import golden_weights

FIXTURES = golden_weights.FIXTURES
EXPECTED = np.load(os.path.join(FIXTURES, 'tensors_expected.npz'))
DTYPES = golden_weights.load_golden()['tensor_dtypes']


@pytest.mark.parametrize(
  'name', ['tensors.pth', 'tensors_legacy.pth', 'tensors_big.pth', 'tensors.safetensors']
)
def test_every_tensor_of_a_torch_written_file_is_read_exactly(name):
  """float32/16, bfloat16, int64, bool; a transposed view sharing a storage, a slice at a storage
  offset, a stride-0 expansion, 0-d, empty, a Parameter; zip, legacy, big-endian, safetensors."""
  state = convert.load_torch_state_dict(os.path.join(FIXTURES, name))
  if name.endswith('.pth'):
    assert list(state) == list(EXPECTED.files)  # the state_dict's order is kept
  assert set(state) == set(EXPECTED.files)
  for key in EXPECTED.files:
    value = state[key]
    dtype = np.dtype(ml_dtypes.bfloat16) if DTYPES[key] == 'bfloat16' else np.dtype(DTYPES[key])
    assert value.dtype == dtype and value.shape == EXPECTED[key].shape, key
    np.testing.assert_array_equal(np.asarray(value).astype(EXPECTED[key].dtype), EXPECTED[key])
  assert state['i64'][3] == -(2**62) and state['transposed'][4, 2] == state['f32'][2, 4]


def test_pth_state_dict_keeps_its_metadata_and_is_plain_numpy():
  state = torch_checkpoint.load(os.path.join(FIXTURES, 'tiny_resnet18.pth'))
  assert state._metadata['bn1'] == {'version': 2}  # torch's BN version record, via BUILD
  assert all(type(v) is np.ndarray and v.flags.c_contiguous for v in state.values())
  assert state['conv1.weight'].shape == (64, 3, 7, 7)


# ---- hand-made pickles: protocol 2 opcodes -------------------------------------------------


def _str(s):
  return b'X' + struct.pack('<I', len(s.encode())) + s.encode()


def _int(i):
  if -(2**31) <= i < 2**31:
    return b'J' + struct.pack('<i', i)
  raw = i.to_bytes(16, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw  # LONG1


def _tuple(items):
  return b'(' + b''.join(items) + b't'


def _global(module, name):
  return b'c' + f'{module}\n{name}\n'.encode()


def _tensor(key, numel, offset, size, stride, storage='FloatStorage', view=None):
  """`_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), offset, size, ...)`;
  `view=(view_key, offset, length)` adds the legacy format's sixth, view, field."""
  fields = [_str('storage'), _global('torch', storage), _str(key), _str('cpu'), _int(numel)]
  if view is not None:
    fields.append(_tuple([_str(view[0]), _int(view[1]), _int(view[2])]))
  pid = _tuple(fields)
  args = [
    pid + b'Q',
    _int(offset),
    _tuple(_int(n) for n in size),
    _tuple(_int(s) for s in stride),
    b'\x89',  # False
    _global('collections', 'OrderedDict') + b')R',
  ]
  return _global('torch._utils', '_rebuild_tensor_v2') + _tuple(args) + b'R'


def _state_pickle(items):
  body = b''.join(_str(k) + v + b's' for k, v in items.items())
  return b'\x80\x02' + _global('collections', 'OrderedDict') + b')R' + body + b'.'


def _zip(path, pkl, storages, extra=()):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', pkl)
    for key, data in storages.items():
      z.writestr(f'archive/data/{key}', data)
    for name in extra:
      z.writestr(name, b'')
  return str(path)


def test_a_hand_made_file_reads_like_torch_would(tmp_path):
  """Guards the helpers below: a valid hand-made file reads, stride and offset honoured."""
  data = np.arange(10, dtype=np.float32).tobytes()
  path = _zip(
    tmp_path / 'ok.pth', _state_pickle({'w': _tensor('0', 10, 1, (3, 2), (1, 3))}), {'0': data}
  )
  np.testing.assert_array_equal(torch_checkpoint.load(path)['w'], [[1, 4], [2, 5], [3, 6]])


def test_a_checkpoint_dict_is_unwrapped_to_its_state_dict(tmp_path):
  """{'state_dict': ..., 'epoch': ...} (a training checkpoint) gives its weights; a state_dict
  that has fc.weight is taken as it is even with a key named state_dict."""
  data = np.arange(6, dtype=np.float32).tobytes()
  inner = _global('collections', 'OrderedDict') + b')R' + _str('w')
  inner += _tensor('0', 6, 0, (3, 2), (2, 1)) + b's'
  outer = _state_pickle({'state_dict': inner, 'epoch': _int(3)})
  state = convert.load_torch_state_dict(_zip(tmp_path / 'ckpt.pth', outer, {'0': data}))
  assert list(state) == ['w']
  np.testing.assert_array_equal(state['w'], [[0, 1], [2, 3], [4, 5]])
  both = _state_pickle({'fc.weight': _tensor('0', 6, 0, (6,), (1,)), 'state_dict': _int(1)})
  state = convert.load_torch_state_dict(_zip(tmp_path / 'both.pth', both, {'0': data}))
  assert list(state) == ['fc.weight', 'state_dict']


def _legacy(obj_pickle, storages):
  """The pre-1.6 stream: magic, protocol 1001, sys_info, the object, its storage keys, then each
  storage as an int64 element count and its little-endian bytes."""
  head = [0x1950A86A20F9469CFC6C, 1001, {'protocol_version': 1001, 'little_endian': True}]
  out = b''.join(pickle.dumps(h, protocol=2) for h in head) + obj_pickle
  out += pickle.dumps(list(storages), protocol=2)
  for array in storages.values():
    out += struct.pack('<q', array.size) + array.astype(array.dtype.newbyteorder('<')).tobytes()
  return out


def test_a_legacy_stream_with_storage_views_reads_like_torch(tmp_path):
  """Two tensors on one storage, one through a storage view (torch < 0.4 wrote those), int64."""
  root = np.arange(12, dtype=np.int64) - 5
  pkl = _state_pickle(
    {
      'full': _tensor('k0', 12, 2, (2, 3), (3, 1), storage='LongStorage'),
      'view': _tensor('k0', 12, 1, (2,), (2,), storage='LongStorage', view=('v', 4, 6)),
    }
  )
  path = tmp_path / 'legacy.pth'
  path.write_bytes(_legacy(pkl, {'k0': root}))
  state = torch_checkpoint.load(str(path))
  np.testing.assert_array_equal(state['full'], [[-3, -2, -1], [0, 1, 2]])
  np.testing.assert_array_equal(state['view'], [0, 2])  # root[4:10][1::2][:2]
  assert state['full'].dtype == np.int64

  path.write_bytes(_legacy(pkl, {'k0': root})[:-8])
  with pytest.raises(ValueError, match='storage k0 is truncated'):
    torch_checkpoint.load(str(path))
  huge = _state_pickle({'w': _tensor('k0', 10**12, 0, (1,), (1,))})
  path.write_bytes(_legacy(huge, {'k0': np.zeros(1, np.float32)}))
  with pytest.raises(ValueError, match='larger than the file'):
    torch_checkpoint.load(str(path))


def test_build_cannot_change_the_readers_own_functions(tmp_path):
  """pickle's BUILD on a resolved global (e.g. setting a function's __defaults__) is refused."""
  state = b'(N}' + _str('__defaults__') + _tuple([_int(1)]) + b'stb'  # BUILD (None, {...})
  pkl = _state_pickle({'w': _global('torch._utils', '_rebuild_tensor_v2') + state})
  with pytest.raises(ValueError, match='damaged'):
    torch_checkpoint.load(_zip(tmp_path / 'build.pth', pkl, {}))
  fn = torch_checkpoint.ALLOWED_GLOBALS['torch._utils', '_rebuild_tensor_v2']
  assert not hasattr(fn, '__dict__')


def test_build_cannot_swap_the_function_an_allowed_global_calls(tmp_path):
  """BUILD's slot state on a resolved global (its own `_fn` slot) is refused: the table of
  allowed globals is shared by every later load in the process."""
  fn = torch_checkpoint.ALLOWED_GLOBALS['torch._utils', '_rebuild_tensor_v2']
  before = fn._fn
  state = b'(N}' + _str('_fn') + _global('collections', 'OrderedDict') + b'stb'
  pkl = _state_pickle({'w': _global('torch._utils', '_rebuild_tensor_v2') + state})
  try:
    with pytest.raises(ValueError, match='damaged'):
      torch_checkpoint.load(_zip(tmp_path / 'swap.pth', pkl, {}))
    assert fn._fn is before
  finally:
    object.__setattr__(fn, '_fn', before)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch PWNED',))


@pytest.mark.parametrize('layout', ['zip', 'legacy', 'inside_a_tensor'])
def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch, layout):
  monkeypatch.chdir(tmp_path)
  evil = pickle.dumps({'fc.weight': _RunsCode()}, protocol=2)
  path = tmp_path / 'evil.pth'
  if layout == 'zip':
    _zip(path, evil, {})
  elif layout == 'legacy':
    path.write_bytes(evil)
  else:  # the call hidden where a tensor's storage would be
    body = _global('posix', 'system') + _tuple([_str('touch PWNED')]) + b'R'
    _zip(path, _state_pickle({'w': body}), {})
  with pytest.raises(ValueError) as e:
    convert.load_torch_state_dict(str(path))
  message = str(e.value)
  assert message.startswith(f'{path}: it references ')
  assert 'system, which a weights-only state_dict never needs' in message
  assert '\n' not in message and not (tmp_path / 'PWNED').exists()


def test_other_globals_and_modules_are_refused(tmp_path):
  for module, name in [
    ('builtins', 'eval'),
    ('torch.nn.modules.conv', 'Conv2d'),
    ('numpy', 'load'),
  ]:
    pkl = _state_pickle({'w': _global(module, name) + b')R'})
    with pytest.raises(ValueError, match=f'references {module}.{name}'):
      torch_checkpoint.load(_zip(tmp_path / f'{name}.pth', pkl, {}))


@pytest.mark.parametrize(
  'offset,size,stride,needle',
  [
    (0, (3, 4), (4, 1), 'reads past its storage of 10 elements'),
    (8, (3,), (1,), 'reads past its storage'),
    (0, (2, 2), (1,), 'bad tensor geometry'),
    (-1, (2,), (1,), 'bad tensor geometry'),
  ],
)
def test_a_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, needle):
  path = _zip(
    tmp_path / 'w.pth',
    _state_pickle({'w': _tensor('0', 10, offset, size, stride)}),
    {'0': bytes(40)},
  )
  with pytest.raises(ValueError, match=needle):
    torch_checkpoint.load(path)


def test_damaged_and_foreign_files_are_one_line_each(tmp_path):
  def fails(path, needle):
    with pytest.raises(ValueError) as e:
      convert.load_torch_state_dict(str(path))
    assert needle in str(e.value) and '\n' not in str(e.value), str(e.value)

  pkl = _state_pickle({'w': _tensor('0', 10, 0, (10,), (1,))})
  fails(_zip(tmp_path / 'short.pth', pkl, {'0': bytes(39)}), 'has 39 bytes, 40 expected')
  fails(_zip(tmp_path / 'nostorage.pth', pkl, {}), 'storage record archive/data/0 is missing')
  fails(_zip(tmp_path / 'ts.pt', pkl, {'0': bytes(40)}, ['archive/code/m.py']), 'TorchScript')
  bad_type = _state_pickle({'w': _tensor('0', 10, 0, (10,), (1,), storage='QInt8Storage')})
  fails(_zip(tmp_path / 'q.pth', bad_type, {'0': bytes(40)}), 'references torch.QInt8Storage')
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(pkl[:30])
  fails(cut, 'damaged')
  text = tmp_path / 'notes.pth'
  text.write_text('not weights')
  fails(text, 'not a torch.save file')
  fails(tmp_path / 'missing.pth', 'no such file')
  fails(tmp_path, 'cannot read it')
  with tarfile.open(tmp_path / 'old.pth', 'w') as tar:
    info = tarfile.TarInfo('sys_info')
    tar.addfile(info, io.BytesIO(b''))
  fails(tmp_path / 'old.pth', 'a tar archive (torch < 0.4')
  plain = tmp_path / 'plain.pth'
  plain.write_bytes(pickle.dumps({'a': 1}, protocol=2))
  fails(plain, "a pickle without torch's magic number")
  fails(_zip(tmp_path / 'list.pth', b'\x80\x02]q\x00.', {}), 'holds a list, not a state_dict')
  header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
  broken = tmp_path / 'broken.safetensors'
  broken.write_bytes(struct.pack('<Q', len(header)) + header + bytes(8))
  fails(broken, 'could not be read as a safetensors file')


def test_convert_cli_refuses_a_crafted_file_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / 'evil.pth'
  path.write_bytes(pickle.dumps({'fc.weight': _RunsCode()}, protocol=2))
  with pytest.raises(SystemExit) as e:
    convert.main(
      ['--arch', 'resnet18', '--torchvision-weights', str(path), '--out', str(tmp_path / 'o')]
    )
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1 and err[0].startswith(f'error: {path}: it references')
  assert not (tmp_path / 'PWNED').exists() and not (tmp_path / 'o').exists()


# Training checkpoints: the weights as training scripts save them (fixtures written by torch,
# tests/fixtures/make_training_checkpoints.py), the rest of the checkpoint read and dropped.


def test_a_torchvision_reference_trainer_checkpoint_gives_its_model_and_its_ema():
  """{'model', 'model_ema' (AveragedModel: n_averaged, 'module.' keys), 'optimizer',
  'lr_scheduler', 'epoch', 'args' (an argparse.Namespace)}: 'model' is the plain state_dict;
  'ema' the averaged model's own keys and values (the fixture's EMA is the model x 0.5)."""
  sets = convert.load_weight_sets(os.path.join(FIXTURES, 'tiny_resnet18_train.pth'))
  plain = convert.load_torch_state_dict(os.path.join(FIXTURES, 'tiny_resnet18.pth'))
  assert set(sets) == {'model', 'ema'}
  assert list(sets['model']) == list(plain) == list(sets['ema'])  # no n_averaged, no 'module.'
  for key, value in plain.items():
    np.testing.assert_array_equal(sets['model'][key], value)
    half = value * np.float32(0.5) if value.dtype == np.float32 else value
    np.testing.assert_array_equal(sets['ema'][key], half)
  assert sets['model']['bn1.running_var'].dtype == np.float32


def test_a_timm_train_checkpoint_gives_state_dict_and_state_dict_ema():
  path = os.path.join(FIXTURES, 'timm_train.pth')
  sets = convert.load_weight_sets(path)
  assert (
    list(sets['model'])
    == list(sets['ema'])
    == [
      'conv1.weight',
      'bn1.weight',
      'fc.weight',
      'bn1.num_batches_tracked',
    ]
  )
  np.testing.assert_array_equal(sets['ema']['conv1.weight'], sets['model']['conv1.weight'] / 2)
  assert sets['model']['bn1.num_batches_tracked'] == 40
  assert convert.load_torch_state_dict(path, 'ema') is not None
  np.testing.assert_array_equal(
    convert.load_torch_state_dict(path)['fc.weight'], sets['model']['fc.weight']
  )


def test_the_arguments_of_a_training_run_are_read_as_values_never_run(tmp_path):
  """argparse.Namespace becomes a plain holder of its values: argparse is never called, and a
  crafted BUILD cannot change the holder class that later loads use."""
  obj = torch_checkpoint.load(os.path.join(FIXTURES, 'tiny_resnet18_train.pth'))
  args = obj['args']
  assert isinstance(args, torch_checkpoint.Namespace)
  assert args.values['model_ema_decay'] == 0.99998 and args.values['auto_augment'] == 'ta_wide'
  assert obj['epoch'] == 11 and obj['lr_scheduler']['_milestones'] == [5]
  build = b'(N}' + _str('__setstate__') + _global('collections', 'OrderedDict') + b'stb'
  pkl = _state_pickle({'w': _global('argparse', 'Namespace') + build})
  with pytest.raises(ValueError, match='damaged'):
    torch_checkpoint.load(_zip(tmp_path / 'build.pth', pkl, {}))
  assert torch_checkpoint.Namespace.__setstate__ is not collections.OrderedDict
  with pytest.raises(AttributeError, match='read-only'):
    torch_checkpoint.Namespace.__setstate__ = collections.OrderedDict
  assert torch_checkpoint.ALLOWED_GLOBALS['argparse', 'Namespace'] is torch_checkpoint.Namespace


def test_convert_takes_the_ema_weights_of_a_training_checkpoint_on_request(tmp_path, capsys):
  """`convert --weights ema` converts the average (torchvision's published V2 weights are the
  EMA of such a run); without it the model's weights, with a note that an EMA is there too."""
  train = os.path.join(FIXTURES, 'tiny_resnet18_train.pth')
  args = ['--arch', 'resnet18', '--torchvision-weights', train, '--out']
  convert.main([*args, str(tmp_path / 'model')])
  out = capsys.readouterr().out
  assert 'wrote resnet18 (11,181,642 parameters, 10 classes)' in out
  assert 'note: the file also holds an EMA of the weights; --weights ema' in out
  convert.main([*args, str(tmp_path / 'ema'), '--weights', 'ema'])
  assert 'wrote resnet18 (the EMA weights) (11,181,642' in capsys.readouterr().out
  model = pretrained.load_model_variables(str(tmp_path / 'model'))
  ema = pretrained.load_model_variables(str(tmp_path / 'ema'))
  plain = convert.from_torchvision(
    convert.load_torch_state_dict(os.path.join(FIXTURES, 'tiny_resnet18.pth')), 'resnet18'
  )
  for got, want, half in zip(
    jax.tree.leaves(model), jax.tree.leaves(plain), jax.tree.leaves(ema), strict=True
  ):
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(half, np.asarray(want) * np.float32(0.5))


def test_ema_weights_asked_of_a_file_without_them_is_one_line(tmp_path, capsys):
  weights = os.path.join(FIXTURES, 'tiny_resnet18.pth')
  with pytest.raises(SystemExit) as e:
    convert.main(
      ['--arch', 'resnet18', '--torchvision-weights', weights, '--out', str(tmp_path / 'o')]
      + ['--weights', 'ema']
    )
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1
  assert err[0].startswith(f'error: {weights} holds no EMA weights')
  assert not (tmp_path / 'o').exists()


def test_a_dict_without_weights_is_named_by_its_keys(tmp_path):
  pkl = _state_pickle(
    {'epoch': _int(3), 'optimizer': _global('collections', 'OrderedDict') + b')R'}
  )
  path = _zip(tmp_path / 'opt.pth', pkl, {})
  with pytest.raises(ValueError) as e:
    convert.load_torch_state_dict(path)
  assert str(e.value).startswith(f"{path}: a dict of 'epoch', 'optimizer' without tensors")


def test_a_tensor_may_not_repeat_its_storage_into_unbounded_memory(tmp_path):
  """A stride-0 tensor (torch's `expand`) reads fine (the fixtures hold one), but one that
  would repeat a 1-element storage into terabytes is refused before any memory is taken."""
  limit = torch_checkpoint.MAX_REPEATED_ELEMENTS
  ok = _state_pickle({'w': _tensor('0', 1, 0, (limit + 1,), (0,))})
  assert torch_checkpoint.load(_zip(tmp_path / 'ok.pth', ok, {'0': bytes(4)}))['w'].shape == (
    limit + 1,
  )
  huge = _state_pickle({'w': _tensor('0', 1, 0, (10**6, 10**6), (0, 0))})
  with pytest.raises(ValueError, match=r'repeats its storage of 1 elements into 3,814,697 MiB'):
    torch_checkpoint.load(_zip(tmp_path / 'huge.pth', huge, {'0': bytes(4)}))
  over = _state_pickle({'w': _tensor('0', 1, 0, (limit + 2,), (0,))})
  with pytest.raises(ValueError, match='stride 0'):
    torch_checkpoint.load(_zip(tmp_path / 'over.pth', over, {'0': bytes(4)}))


def test_the_repeat_limit_holds_for_the_whole_file_too(tmp_path, monkeypatch):
  """Many expands of one small storage add up: 12 tensors just under the per-tensor limit made a
  2 KB file take 768 MiB, and 1,000 would take 64 GiB. A file's tensors together may repeat
  their storages into at most MAX_REPEATED_PER_FILE extra elements (lowered here to 10)."""
  monkeypatch.setattr(torch_checkpoint, 'MAX_REPEATED_PER_FILE', 10)
  five = _tensor('0', 1, 0, (6,), (0,))  # 5 extra elements each
  two = _state_pickle({'a': five, 'b': five})  # 10 in all: reads
  assert len(torch_checkpoint.load(_zip(tmp_path / 'two.pth', two, {'0': bytes(4)}))) == 2
  three = _state_pickle({'a': five, 'b': five, 'c': _tensor('0', 1, 0, (2,), (0,))})
  with pytest.raises(ValueError, match='into more than 10 extra elements in all'):
    torch_checkpoint.load(_zip(tmp_path / 'three.pth', three, {'0': bytes(4)}))
  # The count is per file: another file reads with the whole allowance again.
  assert len(torch_checkpoint.load(_zip(tmp_path / 'again.pth', two, {'0': bytes(4)}))) == 2
