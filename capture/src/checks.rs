//! Start-up checks: what users trip over, reported before the slot is touched. Definite problems
//! stop the capture with the fix spelled out; risky set-ups are logged as warnings.

use tokio_postgres::Client;

use cdc_contract::TableName;

use crate::replication::quote_ident;

/// A finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The capture cannot work: stop.
    Fatal(String),
    /// It works, but something will hurt: warn.
    Warning(String),
}

fn qualified(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

/// Checks the server, the role and the publication; creates the publication (for `tables`, or
/// for all tables) when it is missing.
pub async fn run(
    client: &Client,
    publication: &str,
    tables: &[TableName],
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        findings.push(Finding::Fatal(format!(
            "wal_level is {wal_level}: set wal_level = logical (on RDS and Aurora: the parameter group's \
             rds.logical_replication = 1) and restart the server"
        )));
        return Ok(findings);
    }

    let row = client
        .query_one(
            "SELECT current_user::text, r.rolreplication OR r.rolsuper OR \
                    coalesce(pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = 'rds_replication'), 'member'), false) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let user: String = row.get(0);
    let can_replicate: bool = row.get(1);
    if !can_replicate {
        findings.push(Finding::Fatal(format!(
            "POSTGRES_USER {user} may not replicate: ALTER ROLE {} WITH REPLICATION (on RDS: GRANT rds_replication TO {})",
            quote_ident(&user),
            quote_ident(&user)
        )));
        return Ok(findings);
    }

    let exists = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let via_root = match exists {
        Some(row) => row.get::<_, bool>(0),
        None => {
            let sql = if tables.is_empty() {
                format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES WITH (publish_via_partition_root = true)",
                    quote_ident(publication)
                )
            } else {
                let list: Vec<String> = tables.iter().map(qualified).collect();
                format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                    quote_ident(publication),
                    list.join(", ")
                )
            };
            if let Err(e) = client.batch_execute(&sql).await {
                findings.push(Finding::Fatal(format!(
                    "CDC_PUBLICATION: publication {publication:?} does not exist and creating it failed ({e}); \
                     create it as the tables' owner: {sql}"
                )));
                return Ok(findings);
            }
            tracing::info!(publication, "publication created");
            true
        }
    };

    let published: Vec<TableName> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| !published.contains(t))
        .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
        .collect();
    if !missing.is_empty() {
        findings.push(Finding::Fatal(format!(
            "CDC_TABLES: {} not in publication {publication:?}: ALTER PUBLICATION {} ADD TABLE {}",
            missing.join(", "),
            quote_ident(publication),
            missing.join(", ")
        )));
        return Ok(findings);
    }
    let captured: Vec<&TableName> = if tables.is_empty() {
        published.iter().collect()
    } else {
        tables.iter().collect()
    };
    if captured.is_empty() {
        findings.push(Finding::Warning(format!(
            "publication {publication:?} holds no table: nothing will be captured"
        )));
    }

    for table in captured {
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                        has_table_privilege(c.oid, 'SELECT'), c.relispartition, c.relkind::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await?;
        let Some(row) = row else { continue };
        let identity: String = row.get(0);
        let has_pk: bool = row.get(1);
        let can_select: bool = row.get(2);
        let is_partition: bool = row.get(3);
        let kind: String = row.get(4);
        if identity == "n" || (identity == "d" && !has_pk && kind != "p") {
            findings.push(Finding::Warning(format!(
                "{table} has no primary key or replica identity: UPDATE and DELETE on it fail at the source once it \
                 is published. Add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
                qualified(table)
            )));
        }
        if !can_select {
            findings.push(Finding::Warning(format!(
                "POSTGRES_USER lacks SELECT on {table}: GRANT SELECT ON {} TO the capture's role",
                qualified(table)
            )));
        }
        if is_partition && !via_root {
            findings.push(Finding::Warning(format!(
                "{table} is a partition published on its own: its events carry the partition's name. Publish the \
                 partitioned table with publish_via_partition_root = true so events carry the parent's name"
            )));
        }
    }
    Ok(findings)
}
