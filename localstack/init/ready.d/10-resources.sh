#!/bin/bash
# LocalStack init hook (runs when LocalStack is ready): creates what infra/ creates in AWS, with the
# names the README's local settings use.
set -euo pipefail

BUCKET=${S3_BUCKET_NAME:-cdc-local}
LEDGER=${LEDGER_TABLE:-cdc-ledger}
QUEUE=${NOTIFY_QUEUE:-cdc-notify}

awslocal s3api create-bucket --bucket "$BUCKET"

awslocal dynamodb create-table \
  --table-name "$LEDGER" \
  --attribute-definitions AttributeName=pk,AttributeType=S AttributeName=sk,AttributeType=S \
  --key-schema AttributeName=pk,KeyType=HASH AttributeName=sk,KeyType=RANGE \
  --billing-mode PAY_PER_REQUEST
awslocal dynamodb update-time-to-live \
  --table-name "$LEDGER" \
  --time-to-live-specification Enabled=true,AttributeName=expires_at

DLQ_URL=$(awslocal sqs create-queue --queue-name "$QUEUE-dlq" --query QueueUrl --output text)
DLQ_ARN=$(awslocal sqs get-queue-attributes --queue-url "$DLQ_URL" --attribute-names QueueArn \
  --query Attributes.QueueArn --output text)
awslocal sqs create-queue --queue-name "$QUEUE" \
  --attributes "{\"VisibilityTimeout\":\"1800\",\"RedrivePolicy\":\"{\\\"deadLetterTargetArn\\\":\\\"$DLQ_ARN\\\",\\\"maxReceiveCount\\\":\\\"5\\\"}\"}"
awslocal sqs create-queue --queue-name "$QUEUE-dead-letter-notices"

touch /tmp/cdc-resources-ready
echo "cdc resources ready: bucket=$BUCKET ledger=$LEDGER queue=$QUEUE"
