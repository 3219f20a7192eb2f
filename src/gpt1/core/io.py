"""gpt1's file handling, by idea, importable from here as one place:

- `gpt1.core.paths`: what an argument names, where a write goes (through a link, into a stream,
  not out of the folder it belongs to), and the files of gpt1's folders that no output may
  replace; `file_target` and `folder_target` check an output flag before the work.
- `gpt1.core.atomic`: atomic writes (`atomic_path`, `atomic_dir`, `replace_file`, `write_json`):
  a reader never sees a half-written file. `gpt1.core.temp_files`: their temporary names, and a
  killed writer's leftovers. `gpt1.core.write_errors`: a failed write's error names its file.
- `gpt1.core.locks`: one process at a time writes a folder (`exclusive`).
- `gpt1.core.reading`: bounded reads of files that may come from elsewhere (`read_json`).
- `gpt1.core.weights`: weights checked before use, safetensors written atomically.
- `gpt1.core.fingerprints`, `gpt1.core.crash_points`: what a run records of its files; where
  the crash-safety tests kill it.

Every name was first defined here, and stays importable from here. No torch here: the command
line checks its output paths, and `gpt1 --help` builds its parser, without loading it.
"""

from gpt1.core.atomic import atomic_dir, atomic_path, replace_file, write_json, write_text
from gpt1.core.crash_points import crash_point
from gpt1.core.fingerprints import SAMPLE_BYTES, file_fingerprint, sample_fingerprint
from gpt1.core.locks import check_unlocked, exclusive, held_by_another, lock_holder
from gpt1.core.paths import (
    OWN_FILES,
    OWN_FOLDERS,
    as_path,
    check_within,
    file_target,
    folder_target,
    is_stream,
    json_path,
    make_dirs,
    owner_of,
    write_through,
)
from gpt1.core.reading import MAX_JSON_BYTES, check_regular_file, read_bytes, read_json, walk_folder
from gpt1.core.temp_files import writer_of
from gpt1.core.weights import WEIGHT_DTYPES, check_weight_values, save_safetensors
from gpt1.core.write_errors import writing

__all__ = [
    "MAX_JSON_BYTES", "OWN_FILES", "OWN_FOLDERS", "SAMPLE_BYTES", "WEIGHT_DTYPES", "as_path", "atomic_dir",
    "atomic_path", "check_regular_file", "check_unlocked", "check_weight_values", "check_within", "crash_point",
    "exclusive", "file_fingerprint", "file_target", "folder_target", "held_by_another", "is_stream", "json_path",
    "lock_holder", "make_dirs", "owner_of", "read_bytes", "read_json", "replace_file", "sample_fingerprint",
    "save_safetensors", "walk_folder", "write_json", "write_text", "write_through", "writer_of", "writing",
]
