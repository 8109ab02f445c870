//! Parquet files of archived property points, one row per point, sorted by device, property and
//! time so that a reader's predicates on them skip whole row groups by their statistics.
//!
//! Columns (what DuckDB, Spark, DataFusion, polars and pyarrow see):
//! - `ts`: timestamp, milliseconds, UTC;
//! - `device`, `property`: text;
//! - the value, in exactly one of `int` (64-bit integer), `float` (double), `bool`, `text`
//!   (a TSL text, enum name or date string) and `json` (structs, arrays, nulls and integers
//!   beyond 64 bits, as JSON text); the others are null on that row.
//!
//! A stored value reads back as the same JSON value: integers stay integers, floats keep every
//! bit.

use polars::prelude::*;
use serde_json::Value;
use std::path::Path;

/// What went wrong with an archive file.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file could not be written or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// polars refused the file or the data.
    #[error("{0}")]
    Parquet(#[from] PolarsError),
    /// The file is not one of ours (a column is missing or of another type).
    #[error("not an Ironlink archive file: {0}")]
    Format(String),
}

/// One point to archive.
#[derive(Debug, Clone, Copy)]
pub struct Point<'a> {
    /// Device name.
    pub device: &'a str,
    /// Property identifier (a struct's members are archived whole, as JSON).
    pub property: &'a str,
    /// Time, ms since the epoch.
    pub ts: i64,
    /// The value.
    pub value: &'a Value,
}

/// Rows per row group: small enough that a query of one series reads little beside it, large
/// enough that compression works on long runs.
const ROW_GROUP: usize = 128 * 1024;

/// The earliest and latest time (ms, ± about 190,000 years) a query bound is clamped to.
pub const MAX_MS: i64 = 6_000_000_000_000_000;

/// Writes `points` (in any order) to a new Parquet file at `path`, compressed with zstd, with
/// statistics on every column, and syncs it to disk. Returns the file's size in bytes.
pub fn write(path: &Path, points: &[Point<'_>]) -> Result<u64, ArchiveError> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (&points[*a], &points[*b]);
        (a.device, a.property, a.ts).cmp(&(b.device, b.property, b.ts))
    });
    let n = points.len();
    let mut ts = Vec::with_capacity(n);
    let mut device = Vec::with_capacity(n);
    let mut property = Vec::with_capacity(n);
    let mut int: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut float: Vec<Option<f64>> = Vec::with_capacity(n);
    let mut boolean: Vec<Option<bool>> = Vec::with_capacity(n);
    let mut text: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut json: Vec<Option<String>> = Vec::with_capacity(n);
    for p in order.iter().map(|i| &points[*i]) {
        ts.push(p.ts);
        device.push(p.device);
        property.push(p.property);
        let (mut i, mut f, mut b, mut t, mut j) = (None, None, None, None, None);
        match p.value {
            Value::Number(x) if x.is_i64() => i = x.as_i64(),
            Value::Number(x) if x.is_f64() => f = x.as_f64(),
            Value::Bool(x) => b = Some(*x),
            Value::String(s) => t = Some(s.as_str()),
            // Nulls, structs, arrays, and integers above i64::MAX.
            other => j = Some(other.to_string()),
        }
        int.push(i);
        float.push(f);
        boolean.push(b);
        text.push(t);
        json.push(j);
    }
    let ts = Int64Chunked::from_vec("ts".into(), ts)
        .into_datetime(TimeUnit::Milliseconds, Some(TimeZone::UTC))
        .into_series();
    let mut df = DataFrame::new(
        n,
        vec![
            Column::from(ts),
            Column::new("device".into(), device),
            Column::new("property".into(), property),
            Column::new("int".into(), int),
            Column::new("float".into(), float),
            Column::new("bool".into(), boolean),
            Column::new("text".into(), text),
            Column::new("json".into(), json),
        ],
    )?;
    let mut file = std::fs::File::create(path)?;
    ParquetWriter::new(&mut file)
        .with_compression(ParquetCompression::Zstd(None))
        .with_statistics(StatisticsOptions::full())
        .with_row_group_size(Some(ROW_GROUP))
        .finish(&mut df)?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// The points of one device's property in `[from, to]` from an archive file, oldest first.
pub fn read(
    path: &Path,
    device: &str,
    property: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, Value)>, ArchiveError> {
    let Some(text) = path.to_str() else {
        return Err(ArchiveError::Format(format!(
            "{} is not a UTF-8 path",
            path.display()
        )));
    };
    if !path.is_file() {
        return Err(ArchiveError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is missing", path.display()),
        )));
    }
    let args = ScanArgsParquet {
        glob: false,
        cache: false,
        // The file's own columns only: its `product=`/`day=` directories are for other readers.
        hive_options: HiveOptions::new_disabled(),
        ..ScanArgsParquet::default()
    };
    // polars' timestamps span about ±262,000 years; a bound beyond that would not format.
    let when = |ms: i64| {
        lit(Scalar::new_datetime(
            ms.clamp(-MAX_MS, MAX_MS),
            TimeUnit::Milliseconds,
            Some(TimeZone::UTC),
        ))
    };
    let df = LazyFrame::scan_parquet(PlRefPath::new(text), args)?
        .filter(
            col("device")
                .eq(lit(device))
                .and(col("property").eq(lit(property)))
                .and(col("ts").gt_eq(when(from)))
                .and(col("ts").lt_eq(when(to))),
        )
        .select([
            col("ts").cast(DataType::Int64),
            col("int"),
            col("float"),
            col("bool"),
            col("text"),
            col("json"),
        ])
        .sort(["ts"], SortMultipleOptions::default())
        .collect()?;
    let format = |e: PolarsError| ArchiveError::Format(e.to_string());
    let ts = df.column("ts").and_then(|c| c.i64()).map_err(format)?;
    let int = df.column("int").and_then(|c| c.i64()).map_err(format)?;
    let float = df.column("float").and_then(|c| c.f64()).map_err(format)?;
    let boolean = df.column("bool").and_then(|c| c.bool()).map_err(format)?;
    let text = df.column("text").and_then(|c| c.str()).map_err(format)?;
    let json = df.column("json").and_then(|c| c.str()).map_err(format)?;
    let mut out = Vec::with_capacity(df.height());
    for row in 0..df.height() {
        let Some(t) = ts.get(row) else { continue };
        let value = if let Some(i) = int.get(row) {
            Value::from(i)
        } else if let Some(f) = float.get(row) {
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        } else if let Some(b) = boolean.get(row) {
            Value::Bool(b)
        } else if let Some(s) = text.get(row) {
            Value::String(s.to_owned())
        } else if let Some(j) = json.get(row) {
            serde_json::from_str(j).unwrap_or_else(|_| Value::String(j.to_owned()))
        } else {
            Value::Null
        };
        out.push((t, value));
    }
    Ok(out)
}

/// The UTC day of a time, `YYYY-MM-DD` (proleptic Gregorian; the partition of archive files).
pub fn day(ms: i64) -> String {
    let (y, m, d) = ironlink_shared::time::civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(-1), "1969-12-31");
        assert_eq!(day(951_782_400_000), "2000-02-29");
        assert_eq!(day(1_796_342_399_999), "2026-12-03");
        assert_eq!(day(1_796_342_400_000), "2026-12-04");
    }

    #[test]
    fn every_kind_of_value_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.parquet");
        let values = [
            json!(5),
            json!(-7_000_000_000i64),
            json!(u64::MAX),
            json!(0.1 + 0.2),
            json!(1e300),
            json!(true),
            json!("on"),
            json!("{\"not\": \"json\"}"),
            json!({"lat": 30.5, "fix": 2, "tag": "g"}),
            json!([1, 2.5, "x"]),
            Value::Null,
        ];
        let mut points = Vec::new();
        for (i, v) in values.iter().enumerate() {
            for dev in ["b", "a"] {
                points.push(Point {
                    device: dev,
                    property: "p",
                    ts: 1000 - i as i64,
                    value: v,
                });
            }
            points.push(Point {
                device: "a",
                property: "q",
                ts: i as i64,
                value: &values[0],
            });
        }
        assert!(write(&path, &points).unwrap() > 0);
        let got = read(&path, "a", "p", i64::MIN, i64::MAX).unwrap();
        let mut want: Vec<(i64, Value)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (1000 - i as i64, v.clone()))
            .collect();
        want.reverse();
        assert_eq!(got, want);
        let window = read(&path, "b", "p", 995, 998).unwrap();
        assert_eq!(window.len(), 4);
        assert_eq!(window[0].0, 995);
        assert!(read(&path, "c", "p", i64::MIN, i64::MAX)
            .unwrap()
            .is_empty());
        assert_eq!(read(&path, "a", "q", 3, 3).unwrap(), vec![(3, json!(5))]);
    }

    #[test]
    fn files_under_hive_partition_directories_read_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("product=p1/day=2023-11-14");
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join("part-1.parquet");
        let v = json!(2.5);
        let p = Point {
            device: "d",
            property: "t",
            ts: 1_700_000_000_000,
            value: &v,
        };
        write(&path, &[p]).unwrap();
        assert_eq!(
            read(&path, "d", "t", i64::MIN, i64::MAX).unwrap(),
            vec![(1_700_000_000_000, v.clone())]
        );
    }

    #[test]
    fn a_damaged_or_missing_file_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        assert!(read(&path, "a", "p", 0, 1).is_err());
        std::fs::write(&path, b"PAR1 this is not parquet PAR1").unwrap();
        assert!(read(&path, "a", "p", 0, 1).is_err());
        let good = dir.path().join("good.parquet");
        let v = json!(1);
        write(
            &good,
            &[Point {
                device: "a",
                property: "p",
                ts: 1,
                value: &v,
            }],
        )
        .unwrap();
        let mut bytes = std::fs::read(&good).unwrap();
        let mid = bytes.len() / 2;
        bytes.truncate(mid);
        std::fs::write(&path, bytes).unwrap();
        assert!(read(&path, "a", "p", 0, 10).is_err());
    }
}
