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

/// The oldest PostgreSQL major version the capture runs against (pgoutput's `messages` option,
/// which carries heartbeats and snapshot watermarks, is 14's).
pub const MIN_SERVER_VERSION: i32 = 140_000;

/// What the server is: its version and whether it is a standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `server_version_num` (e.g. 170004).
    pub version_num: i32,
    /// `server_version`, as the server prints it.
    pub version: String,
    /// A standby (in recovery): logical decoding from it needs 16 or later.
    pub in_recovery: bool,
}

/// What the settings ask of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// `CDC_SLOT_FAILOVER`.
    pub failover: bool,
    /// Snapshots may be taken (`CDC_SNAPSHOT` is not `never`, `CDC_BACKFILL_NEW_TABLES`, or
    /// `CDC_RECREATE_SLOT`, whose gap a backfill fills).
    pub snapshots: bool,
}

/// Reads the server's version and role.
pub async fn server(client: &Client) -> Result<Server, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
             pg_is_in_recovery()",
            &[],
        )
        .await?;
    Ok(Server {
        version_num: row.get(0),
        version: row.get(1),
        in_recovery: row.get(2),
    })
}

/// What the server's version and role mean for the settings.
pub fn server_findings(server: &Server, needs: Needs) -> Vec<Finding> {
    let v = &server.version;
    if server.version_num < MIN_SERVER_VERSION {
        return vec![Finding::Fatal(format!(
            "PostgreSQL {v} is not supported: the capture needs PostgreSQL 14 or later (it streams \
             heartbeats and snapshot watermarks as pgoutput logical messages, which 14 added). Upgrade \
             the server"
        ))];
    }
    let mut findings = Vec::new();
    if server.in_recovery && server.version_num < 160_000 {
        findings.push(Finding::Fatal(format!(
            "the server is a standby (in recovery) running PostgreSQL {v}: logical decoding on a \
             standby needs PostgreSQL 16 or later. Point the capture at the primary"
        )));
    }
    if server.in_recovery && needs.snapshots {
        findings.push(Finding::Fatal(
            "the server is a standby (in recovery): snapshots cannot be taken from it (each chunk \
             writes a watermark into the WAL, which a standby cannot do). Set CDC_SNAPSHOT=never and \
             CDC_BACKFILL_NEW_TABLES=false to stream from the standby, or capture from the primary. \
             CDC_RECREATE_SLOT cannot fill its gap there either: start over under a new CDC_SLOT_NAME"
                .into(),
        ));
    }
    if needs.failover && server.version_num < 170_000 {
        findings.push(Finding::Fatal(format!(
            "CDC_SLOT_FAILOVER needs PostgreSQL 17 or later (failover slots); the server runs {v}. \
             Unset it: on older versions a failover loses the slot and the capture stops, saying how \
             to go on"
        )));
    } else if needs.failover && server.in_recovery {
        findings.push(Finding::Fatal(
            "CDC_SLOT_FAILOVER: a slot on a standby cannot be a failover slot. Unset it, or capture \
             from the primary"
                .into(),
        ));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(version_num: i32, in_recovery: bool) -> Server {
        Server {
            version_num,
            version: format!("{}.{}", version_num / 10_000, version_num % 100),
            in_recovery,
        }
    }

    fn fatal(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter_map(|f| match f {
                Finding::Fatal(m) => Some(m.as_str()),
                Finding::Warning(_) => None,
            })
            .collect()
    }

    const PLAIN: Needs = Needs {
        failover: false,
        snapshots: true,
    };

    #[test]
    fn versions_before_14_are_refused_naming_the_version() {
        let f = server_findings(&server(130_023, false), PLAIN);
        let msgs = fatal(&f);
        assert_eq!(msgs.len(), 1);
        assert!(
            msgs[0].contains("PostgreSQL 13.23 is not supported"),
            "{msgs:?}"
        );
        for v in [140_000, 150_014, 160_000, 170_004, 180_001] {
            assert!(server_findings(&server(v, false), PLAIN).is_empty(), "{v}");
        }
    }

    #[test]
    fn a_standby_needs_16_and_no_snapshots() {
        let stream_only = Needs {
            failover: false,
            snapshots: false,
        };
        assert!(
            fatal(&server_findings(&server(150_014, true), stream_only))[0]
                .contains("needs PostgreSQL 16")
        );
        assert!(server_findings(&server(160_004, true), stream_only).is_empty());
        assert!(fatal(&server_findings(&server(160_004, true), PLAIN))[0]
            .contains("CDC_SNAPSHOT=never"));
    }

    #[test]
    fn failover_slots_need_17_on_a_primary() {
        let failover = Needs {
            failover: true,
            snapshots: true,
        };
        assert!(
            fatal(&server_findings(&server(160_004, false), failover))[0]
                .contains("needs PostgreSQL 17")
        );
        assert!(server_findings(&server(170_000, false), failover).is_empty());
        assert!(server_findings(&server(180_004, false), failover).is_empty());
        let on_standby = Needs {
            failover: true,
            snapshots: false,
        };
        assert!(
            fatal(&server_findings(&server(170_000, true), on_standby))[0]
                .contains("cannot be a failover slot")
        );
    }
}
