//! The Glue Data Catalog: one table per captured table over its Parquet prefix, kept by the
//! compactor so every compacted hour is queryable (Athena, Spark, anything reading the catalog)
//! with no crawler and no partition call.
//!
//! A table's columns are the metadata columns, then the columns of the latest schema version
//! (by hour, then position: a late batch of an older hour never takes the table back), typed
//! as the Parquet writer types them. `year`, `month`, `day` and `hour` are partition keys with
//! partition projection (`storage.location.template` over the layout's `year=/month=/day=/hour=`
//! prefixes), so a new hour needs no catalog call at all; the projected year range grows with
//! the years compacted. What the table was built from is kept in its parameters
//! (`cdc.source_table`, `cdc.schema_id`, `cdc.schema_position`), so every run can tell whether an
//! update is due and a second source table mapping to the same catalog name is refused instead
//! of overwritten.
//!
//! Updates are idempotent (the table is read, and written only when it differs from what it
//! should be) and never block compaction: a failed update is retried a few times, then logged,
//! counted (`CatalogUpdateFailures`) and tried again by the next compaction of that table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_glue::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_glue::types::{Column, SerDeInfo, StorageDescriptor, TableInput};
use chrono::Datelike;
use tokio::sync::Mutex;

use cdc_contract::aws::{error_text, AwsError};
use cdc_contract::{Hour, Position, TableName};

use crate::parquet_schema::{
    ColumnType, PartSchema, COMMIT_TS, KEY_BEFORE, LSN, OP, RAW, SEQ, TX_ID,
};

/// Parameter: the source table, `schema.table`.
pub const SOURCE_TABLE: &str = "cdc.source_table";
/// Parameter: the schema version the columns come from.
pub const SCHEMA_ID: &str = "cdc.schema_id";
/// Parameter: where the table's schema version was adopted: the hour and position
/// (`{hour}/{lsn}.{ordinal}`) of the last change written with it then.
pub const SCHEMA_POSITION: &str = "cdc.schema_position";

/// Orders schema versions: the hour, then the position, of a change written with one.
pub type Mark = (Hour, Position);

/// The partition keys, in order, with their projection ranges and digits.
const PARTITIONS: [(&str, &str, Option<u32>); 4] = [
    ("year", "", None),
    ("month", "1,12", Some(2)),
    ("day", "1,31", Some(2)),
    ("hour", "0,23", Some(2)),
];

/// A catalog table as the compactor writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    /// The catalog name.
    pub name: String,
    /// `s3://bucket/{base}/{schema.table}/parquet/`.
    pub location: String,
    /// Data columns: name and Hive type.
    pub columns: Vec<(String, String)>,
    /// Partition keys: name and Hive type.
    pub partition_keys: Vec<(String, String)>,
    /// Table parameters (projection, classification, the `cdc.` ones).
    pub parameters: BTreeMap<String, String>,
}

impl TableDef {
    /// The `cdc.schema_position` parameter, when it has one.
    pub fn schema_position(&self) -> Option<Mark> {
        let (hour, position) = self.parameters.get(SCHEMA_POSITION)?.split_once('/')?;
        Some((hour.parse().ok()?, position.parse().ok()?))
    }

    /// The projected year range.
    pub fn years(&self) -> Option<(i32, i32)> {
        let (a, b) = self
            .parameters
            .get("projection.year.range")?
            .split_once(',')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    }
}

/// A table read back from the catalog, with its version (for a conditional update).
#[derive(Debug, Clone)]
pub struct StoredTable {
    /// What it holds.
    pub def: TableDef,
    /// The catalog's version id, when it gives one.
    pub version_id: Option<String>,
}

/// Why a catalog call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    /// A call failed (transient or not, as classified).
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// The table was created or changed by someone else between the read and the write.
    #[error("the catalog table changed meanwhile")]
    Conflict,
    /// The table's column names cannot be written as a catalog table.
    #[error("{table} cannot have a catalog table: {reason}")]
    Unsupported {
        /// The table.
        table: String,
        /// Why.
        reason: String,
    },
    /// The catalog name is taken by a table of another source table.
    #[error("catalog table {name} belongs to {owner}, not {table}")]
    NameTaken {
        /// The catalog name.
        name: String,
        /// Its `cdc.source_table` (or "a table the compactor did not create").
        owner: String,
        /// The table that maps to the same name.
        table: String,
    },
}

impl crate::retry::Transient for CatalogError {
    fn is_transient(&self) -> bool {
        match self {
            CatalogError::Aws(e) => e.is_transient(),
            CatalogError::Conflict => true,
            CatalogError::NameTaken { .. } | CatalogError::Unsupported { .. } => false,
        }
    }
}

/// What the compactor needs of a data catalog.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// The table named `name`, if it exists.
    async fn get(&self, name: &str) -> Result<Option<StoredTable>, CatalogError>;
    /// Creates the table ([`CatalogError::Conflict`] when it exists already).
    async fn create(&self, def: &TableDef) -> Result<(), CatalogError>;
    /// Replaces the table's definition, on condition that its version is still `version_id`
    /// ([`CatalogError::Conflict`] otherwise).
    async fn update(&self, def: &TableDef, version_id: Option<&str>) -> Result<(), CatalogError>;
}

/// The catalog name of a table: `{schema}__{table}`, lowercase, every character outside
/// `[a-z0-9_]` replaced by `_` (Glue and Athena names are lowercase).
pub fn table_name(table: &TableName) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}__{}", clean(&table.schema), clean(&table.name))
}

/// The Hive type of a column type, as Athena reads the Parquet writer's output. `time` has no
/// Hive type: its microseconds since midnight read as `bigint`.
pub fn hive_type(ty: &ColumnType) -> String {
    match ty {
        ColumnType::Int16 => "smallint".into(),
        ColumnType::Int32 => "int".into(),
        ColumnType::Int64 | ColumnType::Time64 => "bigint".into(),
        ColumnType::Float32 => "float".into(),
        ColumnType::Float64 => "double".into(),
        ColumnType::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
        ColumnType::Boolean => "boolean".into(),
        ColumnType::Utf8 | ColumnType::Json => "string".into(),
        ColumnType::Binary => "binary".into(),
        ColumnType::Date32 => "date".into(),
        ColumnType::Timestamp | ColumnType::TimestampTz => "timestamp".into(),
        ColumnType::List(elem) => format!("array<{}>", hive_type(elem)),
    }
}

/// The year of an hour (UTC).
pub fn year_of(hour: Hour) -> i32 {
    chrono::DateTime::from_timestamp_millis(hour.start_millis()).map_or(1970, |t| t.year())
}

/// The table definition for `table` from `schema` (version `schema_id`, whose last written
/// change is at `position`), located at `location`, projecting the years `years`.
pub fn definition(
    table: &TableName,
    location: &str,
    schema: &PartSchema,
    schema_id: &str,
    position: Mark,
    years: (i32, i32),
) -> TableDef {
    let mut columns: Vec<(String, String)> = vec![
        (OP.into(), "string".into()),
        (LSN.into(), "bigint".into()),
        (SEQ.into(), "bigint".into()),
        (TX_ID.into(), "bigint".into()),
        (COMMIT_TS.into(), "timestamp".into()),
        (RAW.into(), "map<string,string>".into()),
    ];
    if !schema.key_columns.is_empty() {
        let fields: Vec<String> = schema
            .key_columns
            .iter()
            .map(|&i| {
                let c = &schema.columns[i];
                format!("{}:{}", c.file_name.to_lowercase(), hive_type(&c.ty))
            })
            .collect();
        columns.push((KEY_BEFORE.into(), format!("struct<{}>", fields.join(","))));
    }
    columns.extend(
        schema
            .columns
            .iter()
            .map(|c| (c.file_name.to_lowercase(), hive_type(&c.ty))),
    );
    let location = format!("{}/", location.trim_end_matches('/'));
    let mut template = location.trim_end_matches('/').to_owned();
    let mut parameters = BTreeMap::from([
        ("classification".to_owned(), "parquet".to_owned()),
        ("EXTERNAL".to_owned(), "TRUE".to_owned()),
        ("projection.enabled".to_owned(), "true".to_owned()),
        (SOURCE_TABLE.to_owned(), table.to_string()),
        (SCHEMA_ID.to_owned(), schema_id.to_owned()),
        (
            SCHEMA_POSITION.to_owned(),
            format!("{}/{}", position.0, position.1.key()),
        ),
    ]);
    for (key, range, digits) in PARTITIONS {
        parameters.insert(format!("projection.{key}.type"), "integer".into());
        let range = if range.is_empty() {
            format!("{},{}", years.0, years.1)
        } else {
            range.to_owned()
        };
        parameters.insert(format!("projection.{key}.range"), range);
        if let Some(d) = digits {
            parameters.insert(format!("projection.{key}.digits"), d.to_string());
        }
        template.push_str(&format!("/{key}=${{{key}}}"));
    }
    parameters.insert("storage.location.template".into(), format!("{template}/"));
    TableDef {
        name: table_name(table),
        location,
        columns,
        partition_keys: PARTITIONS
            .iter()
            .map(|(k, _, _)| ((*k).to_owned(), "int".to_owned()))
            .collect(),
        parameters,
    }
}

/// What the compactor last saw or wrote for a table, so most compactions make no catalog call.
#[derive(Debug, Clone)]
struct Known {
    schema_id: String,
    position: Mark,
    years: (i32, i32),
    /// When the catalog was last read or written for it: another process may have changed the
    /// table since, so what is known is trusted for [`KNOWN_FOR`] only.
    at: std::time::Instant,
}

/// How long what the catalog said of a table saves reading it again.
const KNOWN_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Refuses column names a catalog table cannot hold: one equal to a partition key, two equal once
/// lowercased (Glue lowercases), or a key column name a Hive `struct<...>` type cannot spell.
pub fn check_names(table: &TableName, schema: &PartSchema) -> Result<(), CatalogError> {
    let unsupported = |reason: String| CatalogError::Unsupported {
        table: table.to_string(),
        reason,
    };
    let mut seen = std::collections::HashSet::new();
    for c in &schema.columns {
        let lower = c.file_name.to_lowercase();
        if PARTITIONS.iter().any(|(k, _, _)| *k == lower) {
            return Err(unsupported(format!(
                "column {:?} has the name of a partition key (year, month, day, hour)",
                c.file_name
            )));
        }
        if !seen.insert(lower) {
            return Err(unsupported(format!(
                "two columns are named {:?} once lowercased",
                c.file_name
            )));
        }
    }
    for &i in &schema.key_columns {
        let name = &schema.columns[i].file_name;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(unsupported(format!(
                "key column {name:?} cannot be a field of the _key_before struct type"
            )));
        }
    }
    Ok(())
}

/// Keeps the catalog tables of the compacted tables up to date.
pub struct CatalogKeeper {
    catalog: Arc<dyn Catalog>,
    bucket: String,
    known: Mutex<HashMap<TableName, Known>>,
    /// Updates that failed, tried again before the next ones (while this process lives; after
    /// that, the table's next compaction brings it up to date).
    failed: Mutex<HashMap<TableName, Written>>,
}

/// What a table needs after a compaction: its latest written schema version and the hour.
#[derive(Debug, Clone)]
pub struct Written {
    /// The table.
    pub table: TableName,
    /// Its Parquet location under the bucket (`{base}/{schema.table}/parquet`).
    pub prefix: String,
    /// The schema version of the last part written.
    pub schema_id: String,
    /// Its layout.
    pub schema: Arc<PartSchema>,
    /// The position of the last change written.
    pub position: Position,
    /// The hour compacted.
    pub hour: Hour,
}

impl Written {
    /// Where this schema version stands among the table's.
    pub fn mark(&self) -> Mark {
        (self.hour, self.position)
    }
}

impl CatalogKeeper {
    /// A keeper over `catalog` for files in `bucket`.
    pub fn new(catalog: Arc<dyn Catalog>, bucket: &str) -> Self {
        CatalogKeeper {
            catalog,
            bucket: bucket.to_owned(),
            known: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The updates that failed earlier in this process, taken out to be tried again.
    pub async fn take_failed(&self) -> Vec<Written> {
        self.failed.lock().await.drain().map(|(_, w)| w).collect()
    }

    /// Brings the table of `w` up to date, retrying transient failures and conflicts; returns
    /// true when it called the catalog to write.
    pub async fn ensure(&self, w: &Written) -> Result<bool, CatalogError> {
        // One table at a time in this process; other processes are fenced by the version id.
        let mut known = self.known.lock().await;
        let year = year_of(w.hour);
        if let Some(k) = known.get(&w.table) {
            let schema_current = k.schema_id == w.schema_id || k.position >= w.mark();
            if schema_current
                && (k.years.0..=k.years.1).contains(&year)
                && k.at.elapsed() < KNOWN_FOR
            {
                return Ok(false);
            }
        }
        check_names(&w.table, &w.schema)?;
        match crate::retry::retry("update catalog table", || self.ensure_once(w, year)).await {
            Ok((wrote, now)) => {
                known.insert(w.table.clone(), now);
                Ok(wrote)
            }
            Err(e) => {
                self.failed.lock().await.insert(w.table.clone(), w.clone());
                Err(e)
            }
        }
    }

    async fn ensure_once(&self, w: &Written, year: i32) -> Result<(bool, Known), CatalogError> {
        let name = table_name(&w.table);
        let location = format!("s3://{}/{}", self.bucket, w.prefix);
        let stored = self.catalog.get(&name).await?;
        let Some(stored) = stored else {
            let def = definition(
                &w.table,
                &location,
                &w.schema,
                &w.schema_id,
                w.mark(),
                (year, year),
            );
            self.catalog.create(&def).await?;
            tracing::info!(table = %w.table, catalog_table = %name, schema = %w.schema_id, "catalog table created");
            return Ok((
                true,
                Known {
                    schema_id: w.schema_id.clone(),
                    position: w.mark(),
                    years: (year, year),
                    at: std::time::Instant::now(),
                },
            ));
        };
        let owner = stored.def.parameters.get(SOURCE_TABLE).cloned();
        if owner.as_deref() != Some(w.table.to_string().as_str()) {
            return Err(CatalogError::NameTaken {
                name,
                owner: owner.unwrap_or_else(|| "a table the compactor did not create".into()),
                table: w.table.to_string(),
            });
        }
        let years = stored
            .def
            .years()
            .map_or((year, year), |(a, b)| (a.min(year), b.max(year)));
        // The newer schema version wins; an older one (a late hour) leaves the columns alone.
        // The recorded position is where the table's version was adopted, so compactions with
        // the same version write nothing.
        let stored_id = stored.def.parameters.get(SCHEMA_ID);
        let stored_position = stored.def.schema_position();
        let desired = if stored_id == Some(&w.schema_id) {
            let position = stored_position.unwrap_or(w.mark());
            definition(
                &w.table,
                &location,
                &w.schema,
                &w.schema_id,
                position,
                years,
            )
        } else if stored_position.is_none_or(|p| w.mark() > p) {
            definition(
                &w.table,
                &location,
                &w.schema,
                &w.schema_id,
                w.mark(),
                years,
            )
        } else {
            let mut def = stored.def.clone();
            def.parameters.insert(
                "projection.year.range".into(),
                format!("{},{}", years.0, years.1),
            );
            def
        };
        let known = Known {
            schema_id: desired
                .parameters
                .get(SCHEMA_ID)
                .cloned()
                .unwrap_or_default(),
            position: desired.schema_position().unwrap_or(w.mark()),
            years,
            at: std::time::Instant::now(),
        };
        if desired == stored.def {
            return Ok((false, known));
        }
        self.catalog
            .update(&desired, stored.version_id.as_deref())
            .await?;
        tracing::info!(table = %w.table, catalog_table = %name, schema = %known.schema_id, years = ?years, "catalog table updated");
        Ok((true, known))
    }
}

/// The Glue Data Catalog, through the AWS SDK.
pub struct GlueCatalog {
    client: aws_sdk_glue::Client,
    database: String,
}

impl GlueCatalog {
    /// The catalog's `database`.
    pub fn new(client: aws_sdk_glue::Client, database: &str) -> Self {
        GlueCatalog {
            client,
            database: database.to_owned(),
        }
    }
}

/// A Glue failure of `what`: throttling, conflicts, 5xx and lost connections are transient;
/// a missing database, denied access and refused input are definite.
fn glue_error<E: ProvideErrorMetadata, R>(what: &str, err: SdkError<E, R>) -> CatalogError {
    let code = err.code().unwrap_or("").to_owned();
    let text = format!("Glue {what}: {}", error_text(&err));
    match (&err, code.as_str()) {
        (
            SdkError::ServiceError(_),
            "AlreadyExistsException" | "ConcurrentModificationException",
        ) => CatalogError::Conflict,
        (
            SdkError::ServiceError(_),
            "EntityNotFoundException"
            | "AccessDeniedException"
            | "InvalidInputException"
            | "ValidationException"
            | "ResourceNumberLimitExceededException"
            | "GlueEncryptionException"
            | "UnrecognizedClientException",
        )
        | (SdkError::ConstructionFailure(_), _) => AwsError::Definite(text).into(),
        _ => AwsError::Transient(text).into(),
    }
}

fn glue_columns(columns: &[(String, String)]) -> Result<Vec<Column>, CatalogError> {
    columns
        .iter()
        .map(|(name, ty)| {
            Column::builder()
                .name(name)
                .r#type(ty)
                .build()
                .map_err(|e| AwsError::Definite(format!("Glue column {name}: {e}")).into())
        })
        .collect()
}

fn table_input(def: &TableDef) -> Result<TableInput, CatalogError> {
    let sd = StorageDescriptor::builder()
        .set_columns(Some(glue_columns(&def.columns)?))
        .location(&def.location)
        .input_format("org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat")
        .output_format("org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat")
        .serde_info(
            SerDeInfo::builder()
                .serialization_library(
                    "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe",
                )
                .build(),
        )
        .build();
    TableInput::builder()
        .name(&def.name)
        .table_type("EXTERNAL_TABLE")
        .description(format!(
            "Changes of {} captured from PostgreSQL (kept by the compactor)",
            def.parameters.get(SOURCE_TABLE).map_or("", String::as_str)
        ))
        .storage_descriptor(sd)
        .set_partition_keys(Some(glue_columns(&def.partition_keys)?))
        .set_parameters(Some(
            def.parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ))
        .build()
        .map_err(|e| AwsError::Definite(format!("Glue table {}: {e}", def.name)).into())
}

#[async_trait]
impl Catalog for GlueCatalog {
    async fn get(&self, name: &str) -> Result<Option<StoredTable>, CatalogError> {
        let out = match self
            .client
            .get_table()
            .database_name(&self.database)
            .name(name)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_entity_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(glue_error("get table", e)),
        };
        let Some(t) = out.table() else {
            return Ok(None);
        };
        let cols = |c: &[Column]| -> Vec<(String, String)> {
            c.iter()
                .map(|c| (c.name().to_owned(), c.r#type().unwrap_or("").to_owned()))
                .collect()
        };
        let sd = t.storage_descriptor();
        Ok(Some(StoredTable {
            def: TableDef {
                name: t.name().to_owned(),
                location: sd.and_then(|s| s.location()).unwrap_or("").to_owned(),
                columns: sd.map(|s| cols(s.columns())).unwrap_or_default(),
                partition_keys: cols(t.partition_keys()),
                parameters: t
                    .parameters()
                    .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
            },
            version_id: t.version_id().map(str::to_owned),
        }))
    }

    async fn create(&self, def: &TableDef) -> Result<(), CatalogError> {
        self.client
            .create_table()
            .database_name(&self.database)
            .table_input(table_input(def)?)
            .send()
            .await
            .map_err(|e| glue_error("create table", e))?;
        Ok(())
    }

    async fn update(&self, def: &TableDef, version_id: Option<&str>) -> Result<(), CatalogError> {
        self.client
            .update_table()
            .database_name(&self.database)
            .table_input(table_input(def)?)
            .set_version_id(version_id.map(str::to_owned))
            .send()
            .await
            .map_err(|e| glue_error("update table", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc_contract::schema::{ColumnSchema, TableSchema};

    fn schema(names: &[(&str, bool)]) -> PartSchema {
        PartSchema::new(&TableSchema {
            table: TableName::new("public", "t"),
            columns: names
                .iter()
                .map(|(n, key)| ColumnSchema {
                    name: (*n).into(),
                    type_name: String::new(),
                    type_oid: 23,
                    typmod: -1,
                    key: *key,
                    base_oid: 23,
                    element_oid: None,
                })
                .collect(),
        })
    }

    #[test]
    fn names_a_catalog_table_cannot_hold_are_refused() {
        let t = TableName::new("public", "t");
        assert!(check_names(&t, &schema(&[("id", true), ("body", false)])).is_ok());
        for bad in [
            schema(&[("id", true), ("Day", false)]),
            schema(&[("id", true), ("ID", false)]),
            schema(&[("my id", true), ("v", false)]),
        ] {
            assert!(matches!(
                check_names(&t, &bad),
                Err(CatalogError::Unsupported { .. })
            ));
        }
    }

    #[test]
    fn names_and_types_follow_glue() {
        assert_eq!(
            table_name(&TableName::new("Sales", "Order-Lines")),
            "sales__order_lines"
        );
        assert_eq!(
            hive_type(&ColumnType::List(Box::new(ColumnType::Decimal {
                precision: 12,
                scale: 2
            }))),
            "array<decimal(12,2)>"
        );
        assert_eq!(hive_type(&ColumnType::Time64), "bigint");
    }
}
