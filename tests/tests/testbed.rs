//! The test bed itself: a throwaway cluster streams a logical change; the emulator serves S3,
//! conditional DynamoDB writes and SQS through the real AWS SDK.

use aws_sdk_dynamodb::types::AttributeValue;
use cdc_contract::ledger;
use pipeline_tests::{
    aws::AwsFixture,
    postgres::{ClusterOptions, PgCluster},
};

#[tokio::test]
async fn throwaway_cluster_streams_a_change_through_a_logical_slot() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let db = pg.create_database("tb").await?;
    let client = pg.connect(&db).await?;
    let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    assert_eq!(level, "logical");
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE PUBLICATION p FOR TABLE t;",
        )
        .await?;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await?;
    client
        .batch_execute("INSERT INTO t VALUES (1, 'hello')")
        .await?;
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL,
                'proto_version', '1', 'publication_names', 'p')",
            &[],
        )
        .await?;
    // pgoutput: Begin, Relation, Insert, Commit; the insert carries the new tuple's text.
    let kinds: Vec<u8> = rows.iter().map(|r| r.get::<_, Vec<u8>>(0)[0]).collect();
    assert_eq!(kinds, b"BRIC".to_vec());
    let insert: Vec<u8> = rows[2].get(0);
    assert!(insert.windows(5).any(|w| w == b"hello"));
    Ok(())
}

/// Without `AWS_ENDPOINT_URL` each fixture starts its own moto. Its request log must not go to
/// a pipe nobody reads: once the pipe's 64 KiB fill up, the server blocks and every call times
/// out (a long test stalled this way).
#[tokio::test]
async fn a_fixtures_own_emulator_keeps_serving_past_a_full_pipe_of_log() -> anyhow::Result<()> {
    // Each test runs in its own process under nextest, so this changes no other test.
    std::env::remove_var("AWS_ENDPOINT_URL");
    let aws = AwsFixture::new().await?;
    let calls = async {
        for i in 0..1500 {
            aws.get_ledger_item(&format!("slot#{i}"), "lease").await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), calls)
        .await
        .map_err(|_| anyhow::anyhow!("the emulator stopped answering"))??;
    Ok(())
}

#[tokio::test]
async fn emulator_serves_s3_conditional_dynamodb_and_sqs() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;

    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key("a/b.txt")
        .body(b"payload".to_vec().into())
        .send()
        .await?;
    assert_eq!(aws.list_keys("a/").await?, vec!["a/b.txt".to_string()]);
    assert_eq!(aws.get_bytes("a/b.txt").await?, b"payload");

    let mut item = ledger::key("slot#x".into(), "lease".into());
    item.insert("epoch".into(), ledger::n(1));
    aws.dynamodb
        .put_item()
        .table_name(&aws.table)
        .set_item(Some(item.clone()))
        .condition_expression("attribute_not_exists(pk)")
        .send()
        .await?;
    let again = aws
        .dynamodb
        .put_item()
        .table_name(&aws.table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .send()
        .await;
    let err = again.expect_err("a second conditional put must fail");
    assert!(
        err.as_service_error()
            .is_some_and(|e| e.is_conditional_check_failed_exception()),
        "unexpected error: {err:?}"
    );
    let got = aws.get_ledger_item("slot#x", "lease").await?.expect("item");
    assert_eq!(got.get("epoch"), Some(&AttributeValue::N("1".into())));

    aws.sqs
        .send_message()
        .queue_url(&aws.queue_url)
        .message_body("{\"hello\":1}")
        .send()
        .await?;
    assert_eq!(aws.drain_queue().await?, vec!["{\"hello\":1}".to_string()]);
    Ok(())
}

#[test]
fn a_missing_server_binary_gives_one_clear_error() {
    let opts = ClusterOptions {
        pg_bin: Some("/nonexistent/bin".into()),
        ..Default::default()
    };
    let err = PgCluster::start_with(opts).err().expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("PG_BIN") && msg.contains("initdb"), "{msg}");
}

/// The Python tools a fresh machine installs (moto, cargo-lambda for the Lambda zip, cfn-lint,
/// pyarrow, duckdb) are pinned to exact versions.
#[test]
fn python_tools_are_pinned() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("scripts/requirements.txt"))?;
    let tools: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        tools.iter().any(|t| t.starts_with("cargo-lambda==")),
        "{tools:?}"
    );
    for tool in tools {
        assert!(tool.contains("=="), "{tool} is not pinned");
    }
    Ok(())
}

#[test]
fn compose_file_pins_localstack_and_turns_logical_replication_on() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg("import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))")
        .arg(root.join("docker-compose.yml"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let services = &compose["services"];
    assert_eq!(
        services["localstack"]["image"],
        "localstack/localstack:4.14.0"
    );
    assert_eq!(services["postgres"]["image"], "postgres:15");
    // The demo's database and emulator listen on the loopback interface only.
    for (service, port) in [("postgres", "5432"), ("localstack", "4566")] {
        let ports: Vec<&str> = services[service]["ports"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(ports, vec![format!("127.0.0.1:{port}:{port}")], "{service}");
    }
    let command: Vec<&str> = services["postgres"]["command"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(command.contains(&"wal_level=logical"), "{command:?}");
    let mounts = services["postgres"]["volumes"].to_string()
        + &services["localstack"]["volumes"].to_string();
    assert!(mounts.contains("init-db.sql"));
    assert!(mounts.contains("/etc/localstack/init/ready.d"));
    let services_env = services["localstack"]["environment"]["SERVICES"]
        .as_str()
        .unwrap_or("");
    for s in ["s3", "sqs", "dynamodb", "cloudwatch"] {
        assert!(services_env.contains(s), "{services_env}");
    }
    // The init hook creates what infra/ creates: the ledger's keys and TTL attribute, a DLQ.
    let hook = std::fs::read_to_string(root.join("localstack/init/ready.d/10-resources.sh"))?;
    assert!(hook.contains("AttributeName=pk") && hook.contains("AttributeName=sk"));
    assert!(hook.contains(cdc_contract::ledger::TTL_ATTRIBUTE));
    assert!(hook.contains("RedrivePolicy"));
    Ok(())
}

#[tokio::test]
async fn init_db_sql_loads_and_gives_the_cdc_user_what_it_needs() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let db = pg.create_database("initdb").await?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    pg.execute(&db, &std::fs::read_to_string(root.join("init-db.sql"))?)
        .await?;
    let client = pg.connect(&db).await?;
    let row = client
        .query_one(
            "SELECT rolreplication, has_table_privilege('cdc_user', 'public.orders', 'SELECT'),
                    (SELECT count(*) FROM pg_publication_tables WHERE pubname = 'cdc_publication')
             FROM pg_roles WHERE rolname = 'cdc_user'",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i64>(2), 2);
    Ok(())
}
