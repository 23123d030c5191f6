//! What a stopped redb store holds, table by table, in bytes: what a lease
//! costs on disk (`leasehold-bench bytes` divides it by the leases).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Key, ReadableDatabase as _, ReadableTableMetadata as _, TableDefinition, Value};

use super::StoreError;
use super::schema::*;
use super::wal::by_table;

/// One table's entries and the bytes of their keys and values as stored
/// (before redb's own pages and headers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableBytes {
    pub entries: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// The whole file: every table, and redb's account of its pages.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Footprint {
    pub tables: BTreeMap<String, TableBytes>,
    pub file_bytes: u64,
    /// What redb says the trees hold (keys, values and their leaf headers).
    pub stored_bytes: u64,
    /// Branch pages and page headers.
    pub metadata_bytes: u64,
    /// Allocated but unused space inside pages.
    pub fragmented_bytes: u64,
}

fn measure<K: Key + 'static, V: Value + 'static>(
    def: TableDefinition<K, V>,
    r: &redb::ReadTransaction,
) -> Result<TableBytes, StoreError> {
    use redb::ReadableTable as _;
    let t = r.open_table(def)?;
    let mut out = TableBytes {
        entries: t.len()?,
        ..TableBytes::default()
    };
    for e in t.iter()? {
        let (k, v) = e?;
        out.key_bytes += K::as_bytes(&k.value()).as_ref().len() as u64;
        out.value_bytes += V::as_bytes(&v.value()).as_ref().len() as u64;
    }
    Ok(out)
}

/// Measure the store file at `path` (its broker stopped, so its log is
/// empty: a clean stop checkpoints).
pub fn footprint(path: &Path) -> Result<Footprint, StoreError> {
    let db = redb::Database::open(path)
        .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
    let mut out = Footprint {
        file_bytes: std::fs::metadata(path)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?
            .len(),
        ..Footprint::default()
    };
    {
        let w = db.begin_write()?;
        let s = w.stats()?;
        out.stored_bytes = s.stored_bytes();
        out.metadata_bytes = s.metadata_bytes();
        out.fragmented_bytes = s.fragmented_bytes();
        w.abort()?;
    }
    let r = db.begin_read()?;
    let names: Vec<String> = {
        use redb::TableHandle as _;
        r.list_tables()?.map(|t| t.name().to_owned()).collect()
    };
    for name in names {
        let t = by_table!(
            name.as_str(),
            measure(&r),
            Err(StoreError::Corrupt(format!("unknown table `{name}`")))
        )?;
        out.tables.insert(name, t);
    }
    Ok(out)
}
