# The network of the capture tasks: an existing VPC (var.vpc), or a created one with public
# subnets only. No NAT gateway (~$33/month each) and no interface endpoint (~$7/month each per
# AZ): the tasks sit in public subnets with a public IP and a security group without inbound rules.

data "aws_availability_zones" "available" {
  count = var.vpc == null ? 1 : 0
  state = "available"
}

resource "aws_vpc" "this" {
  #checkov:skip=CKV2_AWS_11:Flow logs cost per GB ingested; the VPC holds only the capture tasks, which accept no inbound connection. Enable them when a network investigation needs them.
  #checkov:skip=CKV2_AWS_12:Nothing uses the default security group; the capture tasks have their own, without inbound rules.
  count                = var.vpc == null ? 1 : 0
  cidr_block           = "10.0.0.0/16"
  enable_dns_hostnames = true
  enable_dns_support   = true
  tags                 = merge(local.tags, { Name = "${var.name}/Vpc" })
}

resource "aws_internet_gateway" "this" {
  count  = var.vpc == null ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.tags, { Name = "${var.name}/Vpc" })
}

resource "aws_subnet" "public" {
  #checkov:skip=CKV_AWS_130:Public subnets by design: the capture tasks reach PostgreSQL and the AWS APIs through the internet gateway instead of a NAT gateway, and accept no inbound connection.
  count                   = var.vpc == null ? var.max_azs : 0
  vpc_id                  = aws_vpc.this[0].id
  availability_zone       = data.aws_availability_zones.available[0].names[count.index]
  cidr_block              = cidrsubnet("10.0.0.0/16", 8, count.index)
  map_public_ip_on_launch = true
  tags                    = merge(local.tags, { Name = "${var.name}/Vpc/publicSubnet${count.index + 1}" })
}

resource "aws_route_table" "public" {
  count  = var.vpc == null ? var.max_azs : 0
  vpc_id = aws_vpc.this[0].id
  tags   = merge(local.tags, { Name = "${var.name}/Vpc/publicSubnet${count.index + 1}" })
}

resource "aws_route" "public_default" {
  count                  = var.vpc == null ? var.max_azs : 0
  route_table_id         = aws_route_table.public[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this[0].id
}

resource "aws_route_table_association" "public" {
  count          = var.vpc == null ? var.max_azs : 0
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public[count.index].id
}

locals {
  vpc_id           = var.vpc == null ? aws_vpc.this[0].id : var.vpc.vpc_id
  subnet_ids       = var.vpc == null ? aws_subnet.public[*].id : concat(var.vpc.public_subnet_ids, var.vpc.private_subnet_ids)
  assign_public_ip = var.vpc == null ? true : length(var.vpc.public_subnet_ids) > 0
}

resource "aws_security_group" "capture" {
  #checkov:skip=CKV_AWS_382:The capture connects to PostgreSQL hosts and AWS API endpoints whose addresses are not known here; it accepts no inbound connection.
  name_prefix = "${var.name}-capture-"
  description = "Capture tasks: no inbound rule; outbound to PostgreSQL and the AWS APIs"
  vpc_id      = local.vpc_id
  tags        = local.tags

  egress {
    description = "Allow all outbound traffic by default"
    protocol    = "-1"
    from_port   = 0
    to_port     = 0
    cidr_blocks = ["0.0.0.0/0"]
  }

  lifecycle {
    create_before_destroy = true
  }
}
