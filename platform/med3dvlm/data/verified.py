"""Reading Parquet files whose pages carry CRC checksums (the shards and the feature cache are written with them),
one row group at a time with the checksums verified, so that a truncated or bit-flipped file stops the run with one
line naming the file and the row group, never a silent read of altered bytes (Ray Data's own `read_parquet` does not
verify them) nor a traceback from pyarrow.

    ds = read_row_groups(files, columns, where=("case_split", ["train"]))   # a Ray Dataset, in file and row-group order
"""

from __future__ import annotations

from med3dvlm import storage
from med3dvlm.runtime import DAMAGED as MARK
from med3dvlm.runtime import UserError


class ShardError(UserError):
    """A file that cannot be read as written; its message names the file and the row group."""


def damaged(path: str, row_group: int | None, why) -> ShardError:
    where = f"row group {row_group}" if row_group is not None else "its footer"
    return ShardError(f"{MARK}{path}: {where}: {str(why).splitlines()[0][:200]} (truncated or altered on disk since it "
                      f"was written; re-run the command that wrote it)")


def open_file(path: str):
    """`pq.ParquetFile` verifying page checksums; a footer that cannot be read is a ShardError naming the file."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    try:
        return pq.ParquetFile(fs.open_input_file(p), page_checksum_verification=True)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IOError an OSError
        raise damaged(path, None, e) from None


def row_groups(files: list[str], where: tuple[str, list] | None = None) -> list[dict]:
    """(file, row group) of every row group whose statistics can hold a `where` value (all without `where`)."""
    items = []
    for f in files:
        meta = open_file(f).metadata
        col = meta.schema.to_arrow_schema().get_field_index(where[0]) if where else -1
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(col).statistics if col >= 0 else None
            if st is not None and st.has_min_max and not any(st.min <= v <= st.max for v in where[1]):
                continue
            items.append({"file": f, "row_group": i})
    return items


def read_row_group(path: str, index: int, columns: list[str] | None, where: tuple[str, list] | None = None):
    """One row group as a pyarrow Table, its pages verified, filtered by `where`; ShardError naming it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    read = None if columns is None else list(dict.fromkeys(columns + ([where[0]] if where else [])))
    try:
        t = open_file(path).read_row_group(index, columns=read)
    except (OSError, ValueError) as e:
        raise damaged(path, index, e) from None
    if where:
        t = t.filter(pc.is_in(t.column(where[0]), value_set=pa.array(where[1])))
    return t.drop_columns([where[0]]) if where and columns and where[0] not in columns else t


def _read_batch(batch, columns, where):
    import pyarrow as pa

    tables = [read_row_group(f, int(i), columns, where)
              for f, i in zip(batch["file"].to_pylist(), batch["row_group"].to_pylist())]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_row_groups(files: list[str], columns: list[str] | None = None, where: tuple[str, list] | None = None):
    """A Ray Dataset of the files' rows (`columns`, those whose `where[0]` is in `where[1]`), one task a row group."""
    import ray.data

    items = row_groups(files, where) or [{"file": files[0], "row_group": 0}]  # none: one that filters to no rows
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": columns, "where": where})
