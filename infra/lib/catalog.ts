// The query side: a Glue database the compactor keeps one table per captured table in (the final
// Parquet files, partitions by projection, so no partition is ever registered), and an Athena
// workgroup with its own results bucket. Nothing here costs anything at rest: the catalog's free
// tier covers a deployment's tables and requests, Athena bills per query, and the results expire.

import { Aws, ArnFormat, Duration, RemovalPolicy, Stack } from 'aws-cdk-lib';
import * as athena from 'aws-cdk-lib/aws-athena';
import * as glue from 'aws-cdk-lib/aws-glue';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as s3 from 'aws-cdk-lib/aws-s3';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';

/** What the compactor does in the catalog: read a table's definition, create it, update its schema. */
export const CATALOG_ACTIONS = ['glue:GetTable', 'glue:CreateTable', 'glue:UpdateTable'];

export interface CatalogProps {
  /** The Glue database's name (catalog.databaseName). */
  databaseName: string;
  /** The Athena workgroup's name. */
  workGroupName: string;
  /** Days the query results are kept. */
  resultsRetentionDays: number;
  /** The stack's removal policy, for the results bucket. */
  removalPolicy: RemovalPolicy;
}

export class Catalog extends Construct {
  readonly database: glue.CfnDatabase;
  readonly resultsBucket: s3.Bucket;
  readonly workGroup: athena.CfnWorkGroup;
  /** The database's name as a reference to it: whatever reads it is created after the database. */
  readonly databaseName: string;
  /** The catalog, the database and its tables: what the compactor's Glue calls are authorised on. */
  readonly catalogArns: string[];

  constructor(scope: Construct, id: string, props: CatalogProps) {
    super(scope, id);
    const stack = Stack.of(this);

    // Deleted with the stack whatever the removal policy: it holds only table definitions, which
    // the compactor writes again, and a retained database would make the same stack fail to
    // create it again (its name is fixed, unlike the bucket's and the ledger's).
    this.database = new glue.CfnDatabase(this, 'Database', {
      catalogId: Aws.ACCOUNT_ID,
      databaseInput: {
        name: props.databaseName,
        description: `Tables of the change data capture pipeline ${stack.stackName}: one per captured table, kept by its compactor`,
      },
    });
    this.databaseName = this.database.ref;

    // Glue authorises GetTable, CreateTable and UpdateTable on the catalog, the database and the
    // table together; tables are named after captured tables at run time.
    this.catalogArns = [
      stack.formatArn({ service: 'glue', resource: 'catalog', arnFormat: ArnFormat.NO_RESOURCE_NAME }),
      stack.formatArn({ service: 'glue', resource: 'database', resourceName: props.databaseName }),
      stack.formatArn({ service: 'glue', resource: 'table', resourceName: `${props.databaseName}/*` }),
    ];

    // Query results only: Athena writes them with the querying principal's credentials. Encrypted,
    // private and TLS-only like the data bucket; they expire, since a result can be run again.
    this.resultsBucket = new s3.Bucket(this, 'ResultsBucket', {
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      enforceSSL: true,
      minimumTLSVersion: 1.2,
      removalPolicy: props.removalPolicy,
      autoDeleteObjects: props.removalPolicy === RemovalPolicy.DESTROY ? true : undefined,
      lifecycleRules: [
        {
          id: 'ExpireQueryResults',
          expiration: Duration.days(props.resultsRetentionDays),
          // Parts of an upload a failed query left behind; no query runs for a day.
          abortIncompleteMultipartUploadAfter: Duration.days(1),
        },
      ],
    });
    NagSuppressions.addResourceSuppressions(this.resultsBucket, [
      {
        id: 'AwsSolutions-S1',
        reason:
          'Server access logs would need a second bucket and cost per request logged; Athena writes here ' +
          'for the principals who query, whose queries CloudTrail and the workgroup\'s history record.',
      },
    ]);

    this.workGroup = new athena.CfnWorkGroup(this, 'WorkGroup', {
      name: props.workGroupName,
      description: `Queries on the tables of the Glue database ${props.databaseName}`,
      state: 'ENABLED',
      // Deleted with the stack like the database, saved queries included: a workgroup left behind
      // would keep the same stack from creating it again.
      recursiveDeleteOption: true,
      workGroupConfiguration: {
        // Clients cannot send results elsewhere or unencrypted.
        enforceWorkGroupConfiguration: true,
        publishCloudWatchMetricsEnabled: true,
        resultConfiguration: {
          outputLocation: `s3://${this.resultsBucket.bucketName}/results/`,
          encryptionConfiguration: { encryptionOption: 'SSE_S3' },
          // Never a bucket of the same name in another account.
          expectedBucketOwner: Aws.ACCOUNT_ID,
        },
      },
    });
  }

  /** The compactor's statement: exactly its Glue calls, in this database only. */
  compactorStatement(): iam.PolicyStatement {
    return new iam.PolicyStatement({ sid: 'GlueCatalog', actions: CATALOG_ACTIONS, resources: this.catalogArns });
  }
}
