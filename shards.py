"""Tar shards in webdataset's layout (DATA.TRAIN_SHARDS / DATA.VAL_SHARDS): local shards read
as a map-style dataset through a per-shard offset index, pipe:COMMAND shards streamed.

Layout: a shard is a plain (uncompressed) tar; members `<key>.<ext>` with ext one of jpg, jpeg,
png, webp (the image, its original bytes) and `<key>.cls` (the label as decimal text);
consecutive members with the same key make one sample, other members (.json, .txt, ...) are
ignored. timm's imagenet-1k-wds shards and tools/make_shards.py's output both fit. A sample id
is the sample's global position (shard order of the expanded pattern x member order), stable
across runs and the same for both readers: it seeds the sample's augmentation and its
pre-training mask.

Why two readers, and why not webdataset / wids
----------------------------------------------
The loaders of datasets.py guarantee: augmentation and masks seeded per sample; 1 and R
processes see the same global batches (one permutation per epoch from (SEED, epoch)); a run
resumed mid-epoch continues with exactly the batches it would have had; evaluation counts each
sample once for any number of processes; data errors raised in the main thread as one line.
webdataset's pipeline takes rank / worker from torch or from RANK / WORKER variables that
Paddle's launcher does not set; wids, its indexed reader, imports torch. The standard library's
tarfile, plus the braceexpand package for the patterns, is all either reader here needs.

- Local shards (ShardDataset): each member's data is a contiguous byte range of the file, so
  each shard gets an index -- `<shard>.index.json` beside it, written by tools/make_shards.py,
  or built by scanning the tar headers (no image decoded): key, image member, data offset,
  data size, label, .cls offset and size. An index is valid only for the exact file it was
  made from: it records the file's size and st_mtime_ns and a crc32 of its keys and .cls bytes;
  a missing, unreadable, older-format or stale index (size or time differ: a shard rewritten
  in place, even to the same size) is rebuilt by scanning, with one line saying why and
  whether the labels changed. Each read also reads the sample's .cls beside the image (one
  pread) and checks it against the index, so a rewrite that kept size and time is caught too
  (a bad sample naming the index to delete). ShardDataset is an ImageDataset whose image bytes
  come from one pread on a descriptor kept open: every sampler, seed and error path of
  datasets.py applies unchanged, with all the guarantees above.
- pipe:COMMAND shards (ShardStream; e.g. `pipe:curl -s https://host/train-{0000..1023}.tar`,
  or `pipe:cat` to stream local ones front to back): an iterable dataset. The epoch's shard
  order is drawn from (SEED, epoch); each process reads one contiguous range of that order,
  each loader worker one contiguous part of it, through a shuffle buffer
  (DATA.SHARD_SHUFFLE_BUFFER). The epoch length is known beforehand from the sample counts,
  counted once and kept in DATA_PATH/shard_counts.json (source_counts; a cut stream's count is
  never kept). Every sample is read once per epoch; only what the batch size forces
  (< processes x batch) is dropped; evaluation reads each sample once. Resuming mid-epoch
  replays each worker's stream up to where it was without decoding, so it is exact for the
  same number of processes and workers. What it gives up against the local reader: the global
  batches depend on the number of processes and workers, and the shuffle is shard order +
  buffer, not a full permutation.
  A command runs in a process group of its own under a small watchdog process that kills the
  whole group (`curl ... | zstd -d`, `cat x; sleep 9`) when the reader closes the stream early
  or dies in any way (Ctrl-C, SIGTERM, kill -9: Linux's PR_SET_PDEATHSIG), in the counting
  step and in every loader worker; a terminal's Ctrl-C reaches the training process only.

Bad samples (a cut tar, an undecodable image, a sample without .cls when labels are needed,
bad .cls text, a label >= MODEL.NUM_CLASSES, a failing command): with DATA.ON_BAD_IMAGE 'error'
one DataError line naming the shard and the member; with 'skip' the sample keeps its id and is
replaced by a readable one and counted, like an unreadable image of a list file. A tar is cut
when it does not end with its end-of-archive blocks (two 512-byte zero blocks, then zeros only):
cut inside a member, inside a header, or at a member boundary -- also a stream whose command
exits 0. A cut loses the samples after it and counts as one bad sample (index, count and
stream alike). A streamed shard that turns out shorter (its tar complete) or longer than its
stored count: the message says the count may be stale and which entry of which
shard_counts.json to delete to count it again.

Classes: `classes` of both readers (the DataSource contract: label i = classes[i]) come from
classes.txt (classnames.read_classes) in the folder of the first local shard, for pipe:
sources only from DATA_PATH/classes.txt; None when there is none. tools/make_shards.py writes
it. A number of names other than MODEL.NUM_CLASSES (labels needed) is a DataError.

Long steps (scanning shards for their indexes, counting pipe: sources) print a progress line
with counts every PROGRESS_SECONDS.

Config values: DATA.TRAIN_SHARDS / VAL_SHARDS go through YAML (-opts too), so a pattern that
starts with '{' must be quoted twice (-opts DATA.TRAIN_SHARDS "'{a,b}-{0..9}.tar'"); several
patterns can be joined with '::'.
"""
import collections
import io
import json
import logging
import os
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

import numpy as np
import paddle
from braceexpand import UnbalancedBracesError
from braceexpand import braceexpand as _braceexpand

import classnames
import datasets
import utils
from config import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
INDEX_SUFFIX = '.index.json'
INDEX_VERSION = 2  # 2: the file's size, mtime_ns and a checksum of its labels; .cls offsets
PROGRESS_SECONDS = 5.0  # long steps (scanning, counting, writing shards): a line this often


# ------------------------------------------------------------------------------ brace patterns

def braceexpand(pattern):
    """Shell-style brace expansion by the braceexpand package (webdataset's too):
    `a-{0000..0003}.tar`, `{train,val}-{0..1}.tar`, nested braces; `{x}` stays as it is.
    Backslashes are kept (escape=False): they belong to pipe: commands, not to the pattern."""
    try:
        return list(_braceexpand(pattern, escape=False))
    except UnbalancedBracesError:
        raise ConfigError(f'unbalanced braces in the shard pattern {pattern!r}') from None


def expand(pattern, root=''):
    """The shard sources of a DATA.*_SHARDS value, in order: local paths (a relative pattern is
    taken relative to root, DATA.DATA_PATH) or `pipe:COMMAND` strings (braces in the command
    expanded too). Several patterns may be separated by '::'."""
    pattern = pattern.strip()
    if not pattern:
        raise ConfigError('empty shard pattern')
    sources = []
    for part in pattern.split('::'):
        part = part.strip()
        for s in braceexpand(part):
            if s.startswith('pipe:'):
                sources.append(s)
            elif os.path.isabs(os.path.expanduser(s)):
                sources.append(os.path.expanduser(s))
            else:
                if not root:
                    raise datasets.DataError(f'the shard pattern {part!r} is relative but DATA.DATA_PATH'
                                      f' is not set (-data_path DIR), or give an absolute path')
                sources.append(os.path.join(root, s))
    return sources


# ---------------------------------------------------------------------------------- the index

def split_key(name):
    """Member name -> (key, extension): webdataset's rule, the basename split at its first dot
    (the directory stays in the key)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition('.')
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def index_path(shard):
    return shard + INDEX_SUFFIX


def sample_of(key, exts, cls_bytes):
    """The one rule (index and stream) from a key's members to a sample: exts, the extensions
    present; cls_bytes, the .cls member's content (None: none). -> None when the members make
    no sample (metadata only), else (image extension or None, label or None, problem or None).
    Of several image members the first of IMAGE_EXTS is the image."""
    ext = next((e for e in IMAGE_EXTS if e in exts), None)
    if ext is None and 'cls' not in exts:
        return None
    if ext is None:
        return None, None, f'sample {key} has {key}.cls but no image member ' \
                           f'(.{", .".join(IMAGE_EXTS)})'
    if cls_bytes is None:
        return ext, None, None
    text = cls_bytes.decode('utf-8', 'replace').strip()
    if re.fullmatch(r'\d+', text):
        return ext, int(text), None
    return ext, None, f'member {key}.cls: the label {text[:20]!r} is not an integer >= 0'


def label_problem(key, label, need_labels, num_classes):
    """What is wrong with a sample's label for the task (None: nothing)."""
    if label is None:
        return f'sample {key} has no {key}.cls member (the label)' if need_labels else None
    if num_classes is not None and label >= num_classes:
        return (f'{key}.cls: label {label} is outside 0..{num_classes - 1} '
                f'(MODEL.NUM_CLASSES {num_classes})')
    return None


def bad_sample_message(where, reason):
    return (f'bad sample in {where}: {reason}. Fix the shard, or set DATA.ON_BAD_IMAGE skip to '
            f'skip bad samples')


def scan(shard):
    """Index a local tar by reading its headers and .cls members (no image is decoded):
    {'version', 'shard_bytes', 'shard_mtime_ns' (the file it was made from), 'labels_crc32'
    (a checksum of the keys and .cls bytes), 'samples': [[key, image member or null, data
    offset, data size, label or null (no .cls), problem or null, .cls offset, .cls size],
    ...]} in member order. A problem (tar truncated inside a member or a header, unreadable
    .cls, a .cls without an image) is a short text naming the member; the sample keeps its
    place, so sample ids do not move. Keys with neither an image nor a .cls are not samples."""
    groups = []  # [key, {ext: (member name, data offset, data size)}], consecutive keys
    end = 0      # padded end of the last complete member
    truncated, tail_problem = None, None
    samples, crc = [], 0
    with open(shard, 'rb') as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        try:
            tar = tarfile.open(fileobj=f, mode='r:')
        except tarfile.TarError as e:
            raise datasets.DataError(f'{shard}: not a readable tar file ({e})') from None
        try:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if not groups or groups[-1][0] != key:
                    groups.append([key, {}])
                if m.offset_data + m.size > size:  # tarfile does not notice
                    truncated = len(groups) - 1
                    groups[-1][1]['_cut'] = (m.name, m.offset_data, m.size)
                    break
                groups[-1][1].setdefault(ext, (m.name, m.offset_data, m.size))
                end = m.offset_data + (m.size + 511) // 512 * 512
        except tarfile.TarError as e:
            tail_problem = f'tar header unreadable after byte {end} ({e})'
        if truncated is None and tail_problem is None:
            # tarfile stops silently at a cut-off header or at the end of the file: after the
            # last member there must be the end-of-archive zero blocks and nothing else
            f.seek(end)
            if not _all_zero(f):
                tail_problem = f'tar truncated or corrupt after byte {end} (a partial header)'
            elif end + 1024 > size and groups:
                tail_problem = f'tar truncated after byte {end} (no end-of-archive blocks)'
        for key, members in groups:
            if '_cut' in members:
                name, off, n = members['_cut']
                samples.append([key, None, 0, 0, None,
                                f'tar truncated inside member {name} ({n} bytes at byte {off}, '
                                f'the file has {size})', 0, 0])
                continue
            cls_bytes, cls_at = None, (None, 0, 0)
            if 'cls' in members:
                cls_at = members['cls']
                f.seek(cls_at[1])
                cls_bytes = f.read(cls_at[2])
            sample = sample_of(key, members, cls_bytes)
            if sample is None:
                continue  # members of no sample (metadata): ignored
            crc = zlib.crc32(key.encode('utf-8') + b'\0' + (cls_bytes or b'') + b'\0', crc)
            ext, label, problem = sample
            image = members[ext] if ext else (None, 0, 0)
            samples.append([key, *image, label, problem, *cls_at[1:]])
    if tail_problem:
        samples.append([f'<after byte {end}>', None, 0, 0, None, tail_problem, 0, 0])
    return {'version': INDEX_VERSION, 'shard_bytes': size, 'shard_mtime_ns': stat.st_mtime_ns,
            'labels_crc32': crc, 'samples': samples}


def _all_zero(f, chunk=1 << 20):
    """Whether the rest of the open file holds only zero bytes (read in chunks)."""
    while True:
        block = f.read(chunk)
        if not block:
            return True
        if block.strip(b'\0'):
            return False


def write_json(path, obj):
    """Write obj as JSON to path under a temporary name, then rename (several processes may
    write the same file); False, and nothing left behind, when the folder is not writable."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(tmp, 'w') as f:
            json.dump(obj, f, separators=(',', ':'))
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def write_index(shard, index):
    """Write <shard>.index.json; False when the folder is not writable."""
    return write_json(index_path(shard), index)


def stale_reason(index, stat):
    """Why an index does not describe the file of os.stat result `stat` (None: it does). An
    index is valid for the exact file it was made from: same size and modification time."""
    if not isinstance(index, dict) or index.get('version') != INDEX_VERSION:
        version = index.get('version') if isinstance(index, dict) else None
        return f'its index is of format {version}, this version reads {INDEX_VERSION}'
    if index.get('shard_bytes') != stat.st_size:
        return (f'the file has {stat.st_size} bytes, its index was made from '
                f'{index.get("shard_bytes")}')
    if index.get('shard_mtime_ns') != stat.st_mtime_ns:
        return 'the file was modified after its index was made'
    return None


def load_index(shard, log=None):
    """The index of a local shard: <shard>.index.json when it was made from this very file
    (stale_reason), else a scan (written beside the shard when the folder allows; a stale
    index replaced says why in one line)."""
    if not os.path.isfile(shard):
        raise datasets.DataError(f'shard not found: {shard}')
    path = index_path(shard)
    old, why = None, None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            why = stale_reason(old, os.stat(shard))
        except (OSError, ValueError) as e:
            why = f'its index is unreadable ({datasets.explain(e)})'
        if why is None:
            return old
    index = scan(shard)
    if why:
        if isinstance(old, dict) and 'labels_crc32' in old:
            why += ('; the labels are unchanged' if old['labels_crc32'] == index['labels_crc32']
                    else '; the labels differ from the old index')
        (log or _stderr)(f'{shard}: {why}: indexed again')
    if not write_index(shard, index):
        logger.warning('cannot write %s: the shard will be scanned again next time', path)
    return index


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A progress line for a long step, at most every PROGRESS_SECONDS:
    `<what>: <done>/<total><detail>`."""

    def __init__(self, what, total, log=None):
        self.what, self.total, self.log = what, total, log or _stderr
        self.last = time.monotonic()

    def __call__(self, done, detail=''):
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and done < self.total:
            self.last = now
            self.log(f'{self.what}: {done}/{self.total}{detail}')


# -------------------------------------------------------------------------------- the dataset

class OpenShards:
    """Read byte ranges of shards through file descriptors kept open (os.pread: no shared file
    position), at most `most` at a time, least recently used closed first. Descriptors belong
    to the process that opened them: a forked loader worker opens its own. Keeping them open
    is what makes a sample read cheaper than opening an image file."""

    def __init__(self, most=64):
        self.most, self._fds, self._pid = most, collections.OrderedDict(), None

    def read(self, shard, offset, size):
        if self._pid != os.getpid():  # (inherited descriptors are left to their owner)
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= self.most:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(shard, os.O_RDONLY)
        self._fds[shard] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f'read {len(data)} of {size} bytes: the shard changed since it was '
                          f'indexed')
        return data

    def __getstate__(self):  # (a spawned worker starts with none open)
        return {'most': self.most, '_fds': collections.OrderedDict(), '_pid': None}


def shard_sources(config, is_train):
    """-> (the expanded sources of DATA.TRAIN_SHARDS / VAL_SHARDS, the key) or (None, key)
    when the key is empty."""
    key = 'TRAIN_SHARDS' if is_train else 'VAL_SHARDS'
    pattern = config.DATA[key]
    return (expand(pattern, config.DATA.DATA_PATH) if pattern else None), f'DATA.{key}'


def shard_args(config, is_train, transform, need_labels, key_name):
    """The constructor arguments both shard sources take from the config."""
    return dict(transform=transform, need_labels=need_labels,
                num_classes=config.MODEL.NUM_CLASSES if need_labels else None,
                on_bad_image=config.DATA.ON_BAD_IMAGE, mark_skipped=not is_train,
                key_name=key_name)


def classes_path(sources, root=''):
    """Where the shards' class names are: classes.txt in the folder of the first local shard;
    for pipe: sources only, root/classes.txt (root: DATA.DATA_PATH; None without one)."""
    local = next((s for s in sources if not s.startswith('pipe:')), None)
    if local is not None:
        return os.path.join(os.path.dirname(local), classnames.CLASSES_FILE)
    return os.path.join(root, classnames.CLASSES_FILE) if root else None


def shard_classes(sources, root='', need_labels=False, num_classes=None):
    """The class names of the shards (label i = names[i]) from classes_path(), or None when
    there is no such file. DataError for an unreadable file, or for a number of classes other
    than num_classes when labels are needed."""
    path = classes_path(sources, root)
    if path is None:
        return None
    names = datasets.listed_classes(os.path.dirname(path))
    if need_labels:
        datasets.check_class_count(path, names, num_classes)
    return names or None


class ShardDataset(datasets.ImageDataset):
    """Samples of local tar shards -> (float32 image, int64 label, int64 sample id = the
    sample's global position: shard order x member order).

    sources: expand()'s list; need_labels: a sample without .cls is a bad sample (else its
    label is IGNORE_LABEL); num_classes: labels must be below it; key_name: the config key, for
    messages. The other arguments are ImageDataset's. `classes`: shard_classes().
    Each read also reads the sample's .cls member and checks it against the index: a shard
    rewritten with its size and modification time kept is not read with stale labels.
    """

    def __init__(self, sources, transform=None, need_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, key_name='DATA.TRAIN_SHARDS'):
        piped = [s for s in sources if s.startswith('pipe:')]
        if piped:
            raise ConfigError(f'{key_name}: pipe: sources ({piped[0]!r}) cannot be seeked: '
                              f'ShardStream streams them (sources.build_dataset chooses)')
        self.shards = list(sources)
        self.classes = shard_classes(self.shards, need_labels=need_labels,
                                     num_classes=num_classes)
        shard_of, offsets, sizes, labels, names, problems = [], [], [], [], [], {}
        cls_at, rebuilt = [], []
        progress = Progress('shard indexes', len(self.shards))

        def said(line):  # (the first few rebuilt indexes said, the others counted)
            rebuilt.append(line)
            if len(rebuilt) <= 3:
                _stderr(line)

        for s, shard in enumerate(self.shards):
            for key, member, off, n, label, problem, c_off, c_n in load_index(shard, said)[
                    'samples']:
                problem = problem or label_problem(key, label, need_labels, num_classes)
                if problem:
                    problems[len(offsets)] = problem
                shard_of.append(s)
                offsets.append(off)
                sizes.append(n)
                cls_at.append((c_off, c_n))
                labels.append(datasets.IGNORE_LABEL if label is None or problem else label)
                names.append(member or key)
            progress(s + 1, f' shards read, {len(offsets)} samples')
        if len(rebuilt) > 3:
            _stderr(f'... and {len(rebuilt) - 3} more shard(s) indexed again')
        if not offsets:
            raise datasets.DataError(f'{key_name}: the shards ({self.shards[0]} ...) hold no '
                                     f'samples')
        if problems and on_bad_image == 'error':
            i = min(problems)
            raise datasets.DataError(bad_sample_message(f'shard {self.shards[shard_of[i]]}',
                                                        problems[i]))
        self._shard_of = np.asarray(shard_of, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._cls = np.asarray(cls_at, np.int64).reshape(-1, 2)  # .cls (offset, size)
        self._names = np.array([x.encode('utf-8') for x in names], dtype=np.bytes_)
        self.problems = problems  # sample id -> what is wrong with it (few)
        self._open = OpenShards()
        super().__init__([], labels, transform, on_bad_image, mark_skipped)

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        """Local shards (no pipe: source): read by seeking."""
        sources, key = shard_sources(config, is_train)
        if not sources or any(s.startswith('pipe:') for s in sources):
            return None
        return cls(sources, **shard_args(config, is_train, transform, need_labels, key))

    def __len__(self):
        return len(self._offsets)

    def member(self, index):
        return self._names[index].decode('utf-8')

    def path(self, index):
        return f'{self.shards[self._shard_of[index]]}:{self.member(index)}'

    def describe(self, index):
        return f'shard {self.shards[self._shard_of[index]]} member {self.member(index)}'

    def read_bytes(self, index):
        """Sample `index`'s image member, as stored (its .cls read along and checked)."""
        shard = self.shards[self._shard_of[index]]
        off, n = int(self._offsets[index]), int(self._sizes[index])
        c_off, c_n = (int(x) for x in self._cls[index])
        label = int(self.labels[index])
        if not c_n or label < 0:  # (no label, or a problem that read_image raises)
            return self._open.read(shard, off, n)
        lo, hi = min(off, c_off), max(off + n, c_off + c_n)
        if hi - lo <= n + c_n + 4096:  # (neighbours, as tar writers put them): one read
            span = self._open.read(shard, lo, hi - lo)
            data, cls = span[off - lo:off - lo + n], span[c_off - lo:c_off - lo + c_n]
        else:
            data, cls = self._open.read(shard, off, n), self._open.read(shard, c_off, c_n)
        text = cls.decode('utf-8', 'replace').strip()
        if not re.fullmatch(r'\d+', text) or int(text) != label:
            raise OSError(f'its .cls member reads {text[:20]!r}, the index says {label}: the '
                          f'shard was rewritten with its size and time kept; delete '
                          f'{index_path(shard)} to index it again')
        return data

    def read_image(self, index):
        problem = self.problems.get(int(index))
        if problem:
            raise OSError(problem)
        return datasets.decode_image(io.BytesIO(self.read_bytes(index)))


# ------------------------------------------------------------------------------ streamed shards

COUNTS_FILE = 'shard_counts.json'


def counts_path(root):
    """Where the sample counts of pipe: sources are kept: DATA_PATH/shard_counts.json, or the
    user's cache folder when no DATA_PATH is set."""
    if root:
        return os.path.join(root, COUNTS_FILE)
    return os.path.join(os.path.expanduser('~'), '.cache', 'mae_paddle', COUNTS_FILE)


# A pipe: command runs under a watchdog, `python -S -c _WATCHDOG READER_PID COMMAND` (standard
# library only): the command's shell starts a process group of its own, and the watchdog kills
# that whole group (curl | zstd, cat; sleep ...) when its reader closes the stream early
# (SIGTERM from _close_source), when the reader dies in any way -- exit, Ctrl-C, SIGTERM,
# kill -9 (Linux's PR_SET_PDEATHSIG sends the watchdog SIGTERM) -- and, after the shell exits,
# whatever it left running. The watchdog exits with the shell's code. It is started with setsid
# (detached from the terminal), so a terminal's Ctrl-C reaches the training process (which
# saves), not the command.
_WATCHDOG = r'''
import ctypes, os, signal, subprocess, sys
reader, command, group = int(sys.argv[1]), sys.argv[2], None
def stop(*_):
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    os._exit(143)
def child():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGTERM, stop)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
if sys.platform.startswith('linux'):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass
if os.getppid() != reader:
    stop()
proc = subprocess.Popen(command, shell=True, start_new_session=True, preexec_fn=child)
group = proc.pid
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
code = proc.wait()
try:
    os.killpg(group, signal.SIGKILL)
except OSError:
    pass
sys.exit(code if code >= 0 else 128 - code)
'''


def open_source(source):
    """-> (binary stream, subprocess or None): a local file, or the stdout of a pipe: command
    (run by the shell under _WATCHDOG, stderr kept in a temporary file for the message if it
    fails)."""
    if not source.startswith('pipe:'):
        return open(source, 'rb'), None
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, '-S', '-c', _WATCHDOG, str(os.getpid()),
                             source[len('pipe:'):]], stdout=subprocess.PIPE, stderr=err,
                            bufsize=1 << 20, start_new_session=True)
    proc.err = err
    return proc.stdout, proc


def _close_source(f, proc, finished):
    """Close the stream (a command not read to its end: its process group killed); a command
    that failed (after the stream ended) -> its problem text."""
    f.close()
    if proc is None:
        return None
    if not finished:
        proc.terminate()  # the watchdog kills the command's process group
    code = proc.wait()
    proc.err.seek(0)
    tail = proc.err.read()[-300:].decode('utf-8', 'replace').strip().replace('\n', ' ')
    proc.err.close()
    if finished and code != 0:
        return f'the command exited with code {code}' + (f': {tail}' if tail else '')
    return None


class _Kept:
    """A stream read through, keeping its last bytes: what tarfile read past the last member
    (to check the end-of-archive blocks that tarfile skips silently)."""

    def __init__(self, f, keep=1 << 16):
        self.f, self.keep, self.pos, self.buf = f, keep, 0, bytearray()

    def read(self, n=-1):
        data = self.f.read(n)
        self.pos += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.keep:
            del self.buf[:-self.keep]
        return data

    def since(self, offset):
        """The bytes read from stream position offset on (None: no longer kept)."""
        start = self.pos - len(self.buf)
        return bytes(self.buf[offset - start:]) if offset >= start else None


def end_problem(stream, end):
    """What is wrong with the stream after its last member, which ends at byte `end` (None:
    the two zero blocks of the tar's end-of-archive, then zeros only); reads it to its end."""
    head = stream.since(end)
    if head is None:
        return f'cannot check the end of the tar after byte {end}'
    while len(head) < 1024:
        more = stream.read(1024 - len(head))
        if not more:
            break
        head += more
    if not head:
        return (f'the stream ends after byte {end} without the end-of-archive blocks of a tar '
                f'(a cut tar)')
    if head[:512].strip(b'\0'):
        return (f'the stream ends inside a tar header at byte {end} (a cut tar)'
                if len(head) < 512 else f'an unreadable tar header at byte {end} (a cut or '
                                         f'corrupt tar)')
    if len(head) < 1024:
        return (f'the stream ends inside the end-of-archive blocks at byte {end + len(head)} '
                f'(a cut tar)')
    if head[1024:].strip(b'\0') or not _all_zero(stream):
        return f'data after the end-of-archive blocks at byte {end + 1024} (a corrupt tar)'
    return None


def stream_samples(source, read_images=True):
    """The samples of one shard read front to back (tarfile's streaming mode: no seek, so a
    pipe works): yields (key, image member or None, image bytes or None, label or None,
    problem or None, end) in member order, grouped as scan() groups them; end is None for a
    sample. A tar that cannot be read on, or that does not end with its end-of-archive blocks
    (a stream cut at a member boundary or inside a header, the command exiting 0), ends the
    stream with one more item, end 'cut', whose problem says where; a failed pipe: command
    with one item, end 'command', instead."""
    f, proc = open_source(source)
    stream = _Kept(f)
    finished = False
    group = None  # [key, {ext: (member name, bytes or None)}], the current key's members

    def emit(g):
        key, members = g
        sample = sample_of(key, members, members.get('cls', (None, None))[1])
        if sample is None:
            return None
        ext, label, problem = sample
        name, data = members[ext] if ext else (None, None)
        return key, name, data, label, problem, None

    try:
        try:
            with tarfile.open(fileobj=stream, mode='r|') as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = split_key(m.name)
                    if group is None or group[0] != key:
                        if group is not None:
                            item = emit(group)
                            if item:
                                yield item
                        group = [key, {}]
                    if ext not in group[1] and (ext in IMAGE_EXTS or ext == 'cls'):
                        group[1][ext] = (m.name, None)  # (named first: a cut names it)
                        if ext == 'cls' or read_images:
                            group[1][ext] = (m.name, tar.extractfile(m).read())
            if group is not None:
                item = emit(group)
                if item:
                    yield item
            end = tar.offset  # where tarfile stopped: the end-of-archive blocks must follow
            problem = end_problem(stream, end)
            cut = (f'<after byte {end}>', None, None, None, problem, 'cut') if problem else None
        except (tarfile.TarError, OSError, EOFError) as e:
            where = '<start>' if group is None else \
                list(group[1].values())[-1][0] if group[1] else group[0]
            cut = (where, None, None, None, f'the tar is cut or unreadable here ({e})', 'cut')
            while proc is not None and f.read(1 << 20):  # to the end: the command's exit code
                pass
        finished = True
    finally:
        failed = _close_source(f, proc, finished)
    if failed:  # the command's failure explains a cut
        yield '<command>', None, None, None, failed, 'command'
    elif cut:
        yield cut


def count_samples(source):
    """-> (samples of a shard, counted by reading it once (images are not kept), the problem
    of a cut tar or None); a cut counts as one sample, as in scan(). A source that is no tar at
    all, or whose command fails, raises DataError."""
    n, cut = 0, None
    for key, _, _, _, problem, end in stream_samples(source, read_images=False):
        if end == 'command' or (end == 'cut' and key == '<start>'):
            raise datasets.DataError(f'cannot count the samples of {source}: {problem}')
        if end == 'cut':
            cut = problem if key.startswith('<') else f'member {key}: {problem}'
        n += 1
    return n, cut


def source_counts(sources, root, log=None, on_bad_image=None):
    """Sample count of each source, known before any epoch: a local shard's from its index
    (load_index); a pipe: source's from counts_path(root), where sources not yet listed are
    counted once by streaming them and added (written atomically, also when counting stops on
    an error). A cut stream's count is never kept: on_bad_image 'skip' counts it for this run
    (the cut as one bad sample); 'error' raises the bad-sample DataError; None (the tool)
    raises DataError."""
    path = counts_path(root)
    log = log or _stderr
    known = {}
    if any(s.startswith('pipe:') for s in sources) and os.path.isfile(path):
        try:
            with open(path) as f:
                known = json.load(f)
        except (OSError, ValueError) as e:
            raise datasets.DataError(f'{path}: unreadable sample counts ({e}); delete it to count '
                              f'again') from None
    missing = [s for s in sources if s.startswith('pipe:') and s not in known]
    this_run = {}  # counts of cut streams, for this run only
    if missing:
        log(f'counting the samples of {len(missing)} streamed shard(s) once (kept in {path})')
        progress, kept, total = Progress('counting streamed shards', len(missing), log), 0, 0
        try:
            for k, s in enumerate(missing):
                n, cut = count_samples(s)
                total += n
                if cut is None:
                    known[s] = n
                    kept += 1
                elif on_bad_image == 'skip':
                    this_run[s] = n
                    log(f'warning: {s}: {cut}; counted as {n} samples (the cut as one bad '
                        f'sample) for this run only, not kept in {path}')
                elif on_bad_image == 'error':
                    raise datasets.DataError(bad_sample_message(
                        f'shard {s}', f'{cut}; its sample count is not kept'))
                else:
                    raise datasets.DataError(f'cannot count the samples of {s}: {cut}; its '
                                             f'count is not kept')
                progress(k + 1, f' shards, {total} samples')
        finally:
            if kept and not write_json(path, known):
                log(f'cannot write {path}: the shards will be counted again next time')
    return [this_run[s] if s in this_run else known[s] if s.startswith('pipe:')
            else len(load_index(s)['samples']) for s in sources]


class _Bad(Exception):
    """A problem found while reading a streamed shard (its text is the message)."""


class ShardStream(datasets.DataSource, paddle.io.IterableDataset):
    """Shards read front to back, for sources that cannot be seeked (pipe:COMMAND; see the
    module's docstring): yields (float32 image, int64 label, int64 sample id = global position,
    as ShardDataset's).

    An epoch's plan, fixed before the epoch from the sample counts (source_counts):
    - training: the shards in an order drawn from (seed, epoch), their samples laid end to
      end; S = T // (R * B) batches per process (T samples, R processes, batch B; only the
      last T - S*R*B < R*B samples of the order are dropped, as the batch size forces); process
      r reads the contiguous range [r*S*B, (r+1)*S*B);
    - evaluation: the shards in pattern order; process r reads [r*T//R, (r+1)*T//R), its
      last batch short.
    A process's batches j = 0, 1, ... are dealt to its W loader workers round robin (j % W),
    the order in which Paddle's loader collects them; worker w reads the contiguous part of the
    process's range that holds its batches (so every sample is read by one worker only, at
    most one partial shard more per worker) and, in training, shuffles it through a buffer of
    `shuffle_buffer` samples (RNG from (seed, epoch, rank, w)). Resuming at batch k rotates the
    roles (loader worker p plays w = (p + k) % W) and each worker replays its stream up to its
    first batch after k without decoding: the batches after k are those an uninterrupted run
    gets, for the same R and W.
    Bad samples: with on_bad_image 'error' a DataError naming the shard and the member; with
    'skip' a bad sample (undecodable image, no .cls, a sample lost to a cut tar) is replaced by
    the next readable one, keeps its id and is counted in num_skipped.
    """

    streamed = True

    def __init__(self, sources, counts, transform=None, need_labels=True, num_classes=None,
                 on_bad_image='error', mark_skipped=False, train=False, seed=0,
                 shuffle_buffer=0, key_name='DATA.TRAIN_SHARDS', root=''):
        datasets.DataSource.__init__(self, transform, on_bad_image, mark_skipped)
        self.sources = list(sources)
        self.classes = shard_classes(self.sources, root, need_labels, num_classes)
        self.counts_file = counts_path(root)  # (named in messages)
        self.counts = np.asarray(counts, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        if not self.starts[-1]:
            raise datasets.DataError(f'{key_name}: the shards ({self.sources[0]} ...) hold no '
                                     f'samples')
        self.need_labels, self.num_classes = need_labels, num_classes
        self.train, self.seed, self.shuffle_buffer = train, seed, shuffle_buffer
        self.key_name = key_name
        self.batch_size, self.rank, self.nranks, self.num_workers = 1, 0, 1, 0
        self.epoch, self.start_batch = 0, 0

    @classmethod
    def from_config(cls, config, is_train, transform, need_labels):
        """Shards with a pipe: source: streamed front to back."""
        sources, key = shard_sources(config, is_train)
        if not sources or not any(s.startswith('pipe:') for s in sources):
            return None
        if is_train and config.TRAIN.ITERS_PER_EPOCH:
            raise ConfigError('TRAIN.ITERS_PER_EPOCH is not supported with streamed (pipe:) '
                              'shards: an epoch is one pass over them')
        root = config.DATA.DATA_PATH
        counts = source_counts(sources, root, on_bad_image=config.DATA.ON_BAD_IMAGE)
        return cls(sources, counts, train=is_train, seed=config.SEED,
                   shuffle_buffer=config.DATA.SHARD_SHUFFLE_BUFFER, root=root,
                   **shard_args(config, is_train, transform, need_labels, key))

    def __len__(self):
        return int(self.starts[-1])

    def configure(self, batch_size, rank, nranks, num_workers):
        self.batch_size, self.rank, self.nranks = batch_size, rank, nranks
        self.num_workers = num_workers

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self):
        """What an epoch's plan depends on besides (seed, epoch): (processes, loader workers,
        batch); saved with checkpoints, compared on resume (engine.fit)."""
        return self.nranks, self.num_workers, self.batch_size

    # ------------------------------------------------------------------------------ the plan

    def _rank_range(self):
        """[first, last) positions of this process in the epoch's order."""
        total, r, n = len(self), self.rank, self.nranks
        if self.train:
            per = total // (n * self.batch_size) * self.batch_size
            return r * per, (r + 1) * per
        return r * total // n, (r + 1) * total // n

    def num_batches(self):
        """Batches of this process per epoch (the loader's len)."""
        lo, hi = self._rank_range()
        return math.ceil((hi - lo) / self.batch_size)

    def order(self):
        """The epoch's shard order (training: drawn from (seed, epoch))."""
        if self.train:
            return utils.rng(self.seed, self.epoch, 'shards').permutation(len(self.sources))
        return np.arange(len(self.sources))

    def worker_plan(self, w, workers):
        """(first, last) positions of worker role w of `workers`, and how many of its samples
        are already consumed when the epoch starts at self.start_batch."""
        lo, hi = self._rank_range()
        nb, b = self.num_batches(), self.batch_size
        counts = [len(range(v, nb, workers)) for v in range(workers)]
        first = lo + sum(counts[:w]) * b
        last = min(first + counts[w] * b, hi)
        done = len(range(w, min(self.start_batch, nb), workers)) * b
        return first, last, min(done, last - first)

    # --------------------------------------------------------------------------- iteration

    def _records(self, first, last):
        """(sample id, shard, image member, bytes, label, problem) of positions [first, last)
        of the epoch's order, in that order."""
        pos = 0
        for s in self.order():
            n = int(self.counts[s])
            if pos + n <= first:
                pos += n
                continue
            if pos >= last:
                break
            skip, take = max(first - pos, 0), min(last, pos + n) - max(first, pos)
            source, recount = self.sources[s], (f'the count may be stale; delete its entry in '
                                                f'{self.counts_file} to count it again')
            seen, read, failed, cut = 0, 0, None, None
            for i, (key, member, data, label, problem, end) in enumerate(
                    stream_samples(source, read_images=True)):
                if end == 'command':
                    failed = problem
                    break
                if i >= n:  # past the counted samples
                    if end != 'cut':  # the plan of the epoch is wrong: no skipping this
                        raise datasets.DataError(f'shard {source} holds more samples than '
                                                 f'counted ({n}): {recount}')
                    if self.on_bad_image == 'error':  # cut after them: nothing planned lost
                        raise datasets.DataError(bad_sample_message(
                            f'shard {source} member {key}', problem))
                    logger.warning('shard %s member %s: %s (after its %d counted samples)',
                                   source, key, problem, n)
                    break
                read = i + 1
                if end == 'cut':
                    cut = f'{key}: {problem}'
                if i < skip or seen == take:
                    continue
                problem = problem or label_problem(key, label, self.need_labels,
                                                   self.num_classes)
                yield int(self.starts[s]) + i, s, member or key, data, label, problem
                seen += 1
                if seen == take and skip + take < n:  # (to a shard's end: read on, to check)
                    break
            for i in range(skip + seen, skip + take):  # the stream ended early
                reason = failed or (f'lost to the cut tar (at {cut})' if cut else
                                    f'the stream ended after {read} of the {n} samples counted '
                                    f'and the tar is complete: {recount}')
                yield int(self.starts[s]) + i, s, f'sample {i + 1} of {n}', None, None, reason
            pos += n

    def _shuffled(self, records, rng):
        """Buffer shuffle (webdataset's): keep `shuffle_buffer` records, emit a random one as
        each new one arrives."""
        if not self.train or self.shuffle_buffer <= 1:
            yield from records
            return
        buf = []
        for rec in records:
            if len(buf) < self.shuffle_buffer:
                buf.append(rec)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], rec = rec, buf[i]
            yield rec
        rng.shuffle(buf)
        yield from buf

    def _decode(self, rec):
        """-> (image, label); raises _Bad with the problem found while reading, or what
        decoding raises."""
        sid, s, member, data, label, problem = rec
        if problem:
            raise _Bad(problem)
        return (datasets.decode_image(io.BytesIO(data)),
                datasets.IGNORE_LABEL if label is None else label)

    def _where(self, rec):
        return f'shard {self.sources[rec[1]]} member {rec[2]}'

    def _samples(self, records):
        """Decoded, transformed samples; bad ones raised (error) or replaced by the next
        readable one (skip), keeping their ids."""
        pending, last = [], None
        for rec in records:
            try:
                img, label = self._decode(rec)
            except Exception as e:
                if self.on_bad_image == 'error':
                    reason = str(e) if isinstance(e, _Bad) else datasets.explain(e)
                    raise datasets.BadImageError(bad_sample_message(self._where(rec),
                                                                    reason)) from None
                self.count_skipped(self._where(rec), e)
                pending.append(rec[0])
                if len(pending) >= datasets.MAX_BAD_IN_A_ROW:
                    raise datasets.DataError(f'{len(pending)} bad samples in a row, up to '
                                             f'{self._where(rec)}') from None
                continue
            for sid in pending:  # replaced by this one
                yield self._sample(img, datasets.IGNORE_LABEL if self.mark_skipped else label,
                                   sid)
            pending = []
            last = (img, label)
            yield self._sample(img, label, rec[0])
        if pending:
            if last is None:
                raise datasets.DataError(f'no readable sample in {self.key_name} for this '
                                         f'loader worker')
            for sid in pending:
                yield self._sample(last[0], datasets.IGNORE_LABEL if self.mark_skipped
                                   else last[1], sid)

    def _sample(self, img, label, sid):
        return self.transformed(img, sid), np.int64(label), np.int64(sid)

    def __iter__(self):
        info = paddle.io.get_worker_info()
        workers, p = (info.num_workers, info.id) if info is not None else (1, 0)
        w = (p + self.start_batch) % workers
        first, last, done = self.worker_plan(w, workers)
        rng = utils.rng(self.seed, self.epoch, 'buffer', self.rank, w)
        records = self._shuffled(self._records(first, last), rng)
        try:
            for _ in range(done):  # resumed mid-epoch: replay without decoding
                next(records)
            yield from self._samples(records)
        except Exception as e:
            self.record_error(e)  # (deferred: the loader raises it; this worker stops)
