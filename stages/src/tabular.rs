//! Tabular dataset files as published reasoning datasets ship them: Parquet (read with
//! arrow-rs) and JSON / JSONL.
//!
//! Parquet columns are read through typed accessors that borrow from the decoded
//! batch ([`Text`], [`ListOf`], [`Turns`]), so a trace's text is copied once, into the
//! row recorded in the database; any other column is converted to JSON ([`json_at`]).

use std::ops::Range;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, GenericListArray, RecordBatch, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::StageError;

/// Rows decoded at a time: large enough to amortise decoding, small enough that a shard
/// of long traces never sits in memory whole.
pub const BATCH_ROWS: usize = 1024;

/// Format of a dataset file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// By extension: `.parquet` is Parquet, `.jsonl`/`.ndjson` JSONL, anything else JSON
    /// (an array when the text starts with `[`, else one object per line).
    #[default]
    Auto,
    /// Apache Parquet.
    Parquet,
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of objects.
    Json,
}

impl FileFormat {
    /// The format of `file`: `Auto` left as it is means "JSON, judged by content".
    pub fn resolve(self, file: &Path) -> FileFormat {
        if self != FileFormat::Auto {
            return self;
        }
        match file.extension().and_then(|e| e.to_str()) {
            Some("parquet") => FileFormat::Parquet,
            Some("jsonl" | "ndjson") => FileFormat::Jsonl,
            _ => FileFormat::Auto,
        }
    }
}

/// The batches of a Parquet file's top-level columns that `keep` accepts (by name), decoded
/// from its bytes (already read and hashed), and the file's whole schema: columns left out
/// are never decompressed or decoded.
pub fn parquet_reader(
    file: &Path,
    bytes: bytes::Bytes,
    keep: impl Fn(&str) -> bool,
) -> Result<(arrow_schema::SchemaRef, ParquetRecordBatchReader), StageError> {
    let unreadable = |e: parquet::errors::ParquetError| {
        StageError::Input(format!(
            "{}: not a readable Parquet file (truncated or corrupt?): {e}",
            file.display()
        ))
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(unreadable)?;
    let schema = builder.schema().clone();
    let roots = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| keep(f.name()))
        .map(|(i, _)| i);
    let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(unreadable)?;
    Ok((schema, reader))
}

/// The error for a batch that failed to decode (a corrupt page).
pub fn batch_error(file: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::Input(format!("{}: corrupt Parquet data: {e}", file.display()))
}

/// A string column: `string`, `large_string` or `string_view`.
#[derive(Clone, Copy)]
pub enum Text<'a> {
    /// 32-bit offsets.
    Small(&'a arrow_array::StringArray),
    /// 64-bit offsets.
    Large(&'a arrow_array::LargeStringArray),
    /// Views.
    View(&'a arrow_array::StringViewArray),
}

impl<'a> Text<'a> {
    /// Whether a column of this type reads as text.
    pub fn accepts(dt: &DataType) -> bool {
        matches!(
            dt,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        )
    }

    /// The column as text, when it is.
    pub fn of(a: &'a dyn Array) -> Option<Self> {
        a.as_string_opt::<i32>()
            .map(Text::Small)
            .or_else(|| a.as_string_opt::<i64>().map(Text::Large))
            .or_else(|| a.as_string_view_opt().map(Text::View))
    }

    /// Row `i`, `None` when null.
    pub fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            Text::Small(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A list column (`list` or `large_list`).
#[derive(Clone, Copy)]
pub enum ListOf<'a> {
    /// 32-bit offsets.
    Small(&'a GenericListArray<i32>),
    /// 64-bit offsets.
    Large(&'a GenericListArray<i64>),
}

impl<'a> ListOf<'a> {
    /// The element type, when `dt` is a list.
    pub fn item(dt: &DataType) -> Option<&DataType> {
        match dt {
            DataType::List(f) | DataType::LargeList(f) => Some(f.data_type()),
            _ => None,
        }
    }

    /// The column as a list, when it is.
    pub fn of(a: &'a dyn Array) -> Option<Self> {
        a.as_list_opt::<i32>()
            .map(ListOf::Small)
            .or_else(|| a.as_list_opt::<i64>().map(ListOf::Large))
    }

    /// Positions of row `i`'s elements in [`ListOf::values`], `None` when null.
    pub fn range(&self, i: usize) -> Option<Range<usize>> {
        match self {
            ListOf::Small(a) => (!a.is_null(i)).then(|| {
                let o = a.value_offsets();
                o[i] as usize..o[i + 1] as usize
            }),
            ListOf::Large(a) => (!a.is_null(i)).then(|| {
                let o = a.value_offsets();
                o[i] as usize..o[i + 1] as usize
            }),
        }
    }

    /// The elements of every row, end to end.
    pub fn values(&self) -> &'a ArrayRef {
        match self {
            ListOf::Small(a) => a.values(),
            ListOf::Large(a) => a.values(),
        }
    }
}

/// A chat column: a list of `{role, content}` (OpenAI) or `{from, value}` (ShareGPT)
/// structs.
#[derive(Clone, Copy)]
pub struct Turns<'a> {
    list: ListOf<'a>,
    role: Text<'a>,
    content: Text<'a>,
}

/// The (role, content) field names chat columns use.
const TURN_FIELDS: [(&str, &str); 2] = [("role", "content"), ("from", "value")];

impl<'a> Turns<'a> {
    /// Whether a column of this type is a chat column.
    pub fn accepts(dt: &DataType) -> bool {
        let Some(DataType::Struct(fields)) = ListOf::item(dt) else {
            return false;
        };
        let text = |name: &str| {
            fields
                .iter()
                .any(|f| f.name() == name && Text::accepts(f.data_type()))
        };
        TURN_FIELDS.iter().any(|(r, c)| text(r) && text(c))
    }

    /// The column as chat turns, when it is one.
    pub fn of(a: &'a dyn Array) -> Option<Self> {
        let list = ListOf::of(a)?;
        let s: &'a StructArray = list.values().as_struct_opt()?;
        TURN_FIELDS.iter().find_map(|(r, c)| {
            Some(Turns {
                list,
                role: Text::of(s.column_by_name(r)?.as_ref())?,
                content: Text::of(s.column_by_name(c)?.as_ref())?,
            })
        })
    }

    /// Row `i`'s turns as (role, content), `None` when the row is null.
    pub fn get(
        &self,
        i: usize,
    ) -> Option<impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>> {
        let (role, content) = (self.role, self.content);
        self.list
            .range(i)
            .map(move |r| r.map(move |j| (role.get(j), content.get(j))))
    }
}

/// Whether [`json_at`] can convert a column of this type.
pub fn json_supported(dt: &DataType) -> bool {
    match dt {
        DataType::Null
        | DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64 => true,
        dt if Text::accepts(dt) => true,
        DataType::List(f) | DataType::LargeList(f) => json_supported(f.data_type()),
        DataType::Struct(fields) => fields.iter().all(|f| json_supported(f.data_type())),
        _ => false,
    }
}

/// Row `i` of a column as JSON; the column's type must pass [`json_supported`].
pub fn json_at(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            a.as_primitive_opt::<$t>().map(|p| Value::from(p.value(i)))
        };
    }
    let v = match a.data_type() {
        DataType::Boolean => a.as_boolean_opt().map(|b| Value::Bool(b.value(i))),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => a
            .as_primitive_opt::<Float32Type>()
            .map(|p| Value::from(f64::from(p.value(i)))),
        DataType::Float64 => num!(Float64Type),
        DataType::List(_) | DataType::LargeList(_) => ListOf::of(a).map(|l| {
            let values = l.values();
            Value::Array(
                l.range(i)
                    .unwrap_or(0..0)
                    .map(|j| json_at(values.as_ref(), j))
                    .collect(),
            )
        }),
        DataType::Struct(_) => a.as_struct_opt().map(|s| {
            Value::Object(
                s.fields()
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), json_at(c.as_ref(), i)))
                    .collect(),
            )
        }),
        _ => Text::of(a).and_then(|t| t.get(i)).map(Value::from),
    };
    v.unwrap_or(Value::Null)
}

/// Every row of a Parquet file as a JSON object, for small files (prompt sets): a
/// column of a type JSON cannot hold is an error naming it.
pub fn parquet_records(
    file: &Path,
    bytes: bytes::Bytes,
) -> Result<Vec<Map<String, Value>>, StageError> {
    let (schema, reader) = parquet_reader(file, bytes, |_| true)?;
    for f in schema.fields() {
        if !json_supported(f.data_type()) {
            return Err(StageError::Input(format!(
                "{}: column `{}` has type {}, which distill cannot read",
                file.display(),
                f.name(),
                f.data_type()
            )));
        }
    }
    let mut out = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| batch_error(file, e))?;
        let names: Vec<&String> = batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name())
            .collect();
        for i in 0..batch.num_rows() {
            out.push(
                names
                    .iter()
                    .zip(batch.columns())
                    .map(|(n, c)| ((*n).clone(), json_at(c.as_ref(), i)))
                    .collect(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{BooleanArray, Int64Array, StringArray};
    use arrow_schema::{Field, Fields};

    use super::*;

    #[test]
    fn reads_text_lists_and_turns_and_converts_the_rest_to_json() {
        let mut lb = ListBuilder::new(StringBuilder::new());
        lb.values().append_value("a");
        lb.values().append_value("b");
        lb.append(true);
        lb.append(false);
        let list = lb.finish();
        let l = ListOf::of(&list).unwrap();
        let t = Text::of(l.values().as_ref()).unwrap();
        let got: Vec<_> = l.range(0).unwrap().map(|j| t.get(j).unwrap()).collect();
        assert_eq!(got, ["a", "b"]);
        assert!(l.range(1).is_none());
        assert_eq!(json_at(&list, 0), serde_json::json!(["a", "b"]));

        let fields = Fields::from(vec![
            Field::new("from", DataType::Utf8, true),
            Field::new("value", DataType::Utf8, true),
        ]);
        let s = StructArray::new(
            fields.clone(),
            vec![
                Arc::new(StringArray::from(vec!["user", "assistant"])) as ArrayRef,
                Arc::new(StringArray::from(vec!["q", "a"])) as ArrayRef,
            ],
            None,
        );
        let item = Arc::new(Field::new("item", DataType::Struct(fields), true));
        let turns = GenericListArray::<i32>::new(
            item,
            arrow_buffer::OffsetBuffer::new(vec![0i32, 2].into()),
            Arc::new(s),
            None,
        );
        assert!(Turns::accepts(turns.data_type()));
        let got: Vec<_> = Turns::of(&turns).unwrap().get(0).unwrap().collect();
        assert_eq!(
            got,
            [(Some("user"), Some("q")), (Some("assistant"), Some("a"))]
        );
        assert!(json_supported(&DataType::List(Arc::new(Field::new(
            "item",
            DataType::Boolean,
            true
        )))));
        assert!(!json_supported(&DataType::Date32));
        assert_eq!(
            json_at(&BooleanArray::from(vec![true]), 0),
            Value::Bool(true)
        );
        assert_eq!(json_at(&Int64Array::from(vec![7]), 0), Value::from(7));
    }
}
