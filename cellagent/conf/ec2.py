"""[ec2] options: the Amazon EC2 backend (``[backend] driver = ec2``).

Where and as whom to launch, how flavors and images map to EC2, what the
operator allows us to spend, and how hard we may press the EC2 API. See
``docs/ec2.md`` for the design these options tune.
"""

from oslo_config import cfg

from cellagent.conf import group

ec2_group = cfg.OptGroup("ec2", title="Amazon EC2 backend options", help="""
The Amazon EC2 backend: region and credentials, the flavor and image maps,
launch settings (subnet, security groups, key pair, tags), the operator's
budget, and the API pacing (batching, rate limiter, retries).
""")

ec2_opts = [
    # -- where, and as whom ------------------------------------------------
    cfg.StrOpt(
        "region",
        default="us-east-1",
        help="""
EC2 region in which this cell launches its instances.

Possible values:

* An AWS region name such as ``us-east-1`` or ``eu-west-3``.

Related options:

* ``endpoint_url``
"""),
    cfg.URIOpt(
        "endpoint_url",
        default=None,
        schemes=["http", "https"],
        help="""
EC2 API endpoint, instead of the region's public one.

For an EC2-compatible cloud, a VPC endpoint, or a moto server in tests.
When set, the vCPU quota is not asked of Service Quotas (that is a
different endpoint) and ``vcpu_quota`` is used.

Possible values:

* unset: the region's public EC2 endpoint
* an http(s) URL

Related options:

* ``region``, ``vcpu_quota``
"""),
    cfg.StrOpt(
        "profile",
        default=None,
        help="""
Named profile of the shared AWS credentials and config files.

Possible values:

* unset: the standard boto3 credential chain (environment, shared files,
  container or instance role)
* a profile name from ``~/.aws/credentials`` or ``~/.aws/config``

Related options:

* ``access_key_id``, ``secret_access_key``
"""),
    cfg.StrOpt(
        "access_key_id",
        default=None,
        secret=True,
        help="""
AWS access key id, when the credentials are given here.

Prefer an instance role or a profile. Never logged; masked in the logged
option values.

Possible values:

* unset: the boto3 credential chain (or ``profile``)
* an access key id; ``secret_access_key`` must then be set too

Related options:

* ``secret_access_key``, ``profile``
"""),
    cfg.StrOpt(
        "secret_access_key",
        default=None,
        secret=True,
        help="""
AWS secret access key matching ``access_key_id``.

Never logged; masked in the logged option values.

Possible values:

* unset: the boto3 credential chain (or ``profile``)
* the secret key of ``access_key_id``

Related options:

* ``access_key_id``
"""),
    cfg.StrOpt(
        "owner",
        default=None,
        sample_default="<[cells] name>",
        help="""
Value of the ``cellagent:owner`` tag put on every instance this cell launches.

The backend sees (polls, lists, reconciles, deletes by uuid) only instances
carrying this tag, so it must be the same for every agent process of one
cell and differ between cells that share an AWS account.

Possible values:

* unset: the cell name (``[cells] name``)
* any tag value (at most 256 characters)

Related options:

* ``tags``
"""),
    # -- launch settings ---------------------------------------------------
    cfg.StrOpt(
        "subnet_id",
        default=None,
        help="""
VPC subnet in which instances are launched.

Checked with DescribeSubnets at startup.

Possible values:

* unset: the default subnet of the default VPC
* a subnet id such as ``subnet-0abc1234``

Related options:

* ``security_group_ids``
"""),
    cfg.ListOpt(
        "security_group_ids",
        default=[],
        help="""
VPC security groups standing for Nova's ``default`` security group.

They are what an instance gets when its build asks for ``default`` (or for
no group), unless ``security_group_map`` maps ``default`` itself; other
Nova group names are translated through ``security_group_map``. Checked
with DescribeSecurityGroups at startup.

Possible values:

* empty: the VPC's default security group
* a list of security group ids such as ``sg-0abc1234``

Related options:

* ``security_group_map``, ``subnet_id``
"""),
    cfg.DictOpt(
        "security_group_map",
        default={},
        help="""
Nova security group name to the EC2 security group id it stands for.

Each name in a build's security groups is looked up here, and the
instance gets the union of the mapped groups. ``default`` that is not
mapped here means ``security_group_ids``. Any other name missing here
fails the build at once, before any launch, with a fault naming the group:
an instance is never launched with wider or other rules than it asked
for. Builds with different groups are launched in different RunInstances.
Every group id is checked with DescribeSecurityGroups at startup.

Possible values:

* ``name:group id`` pairs, e.g. ``web:sg-0abc1234,db:sg-0def5678``

Related options:

* ``security_group_ids``
"""),
    cfg.StrOpt(
        "key_name",
        default=None,
        help="""
EC2 key pair installed in instances whose build carries no key of its own.

With ``key_pair_mode = fixed`` every instance gets this key pair; with
``import`` only the builds without a public key (``key_data``) do.
Checked with DescribeKeyPairs at startup.

Possible values:

* unset: no key pair
* the name of an existing EC2 key pair of the region

Related options:

* ``key_pair_mode``
"""),
    cfg.StrOpt(
        "key_pair_mode",
        default="import",
        choices=[
            ("import", "a build's public key is imported into EC2 (once per key) and "
                       "installed; builds without one get ``key_name``"),
            ("fixed", "every instance gets ``key_name`` (or no key pair); the "
                      "build's key is ignored"),
        ],
        help="""
Where an instance's EC2 key pair comes from.

In ``import`` mode, a build that carries the user's public key (Nova's
``key_data``) gets an EC2 key pair named ``cellagent-<first 20 hex digits
of the SHA-256 of the key>``, imported with ImportKeyPair the first time
the key is seen (tagged with ``cellagent:owner`` and ``cellagent:cell``)
and reused after: a storm of builds of one user imports once. Imported key
pairs are never deleted when an instance is, since other instances may
share them; delete unused ``cellagent-*`` key pairs by hand if needed.

Possible values:

* import (default), fixed

Related options:

* ``key_name``
"""),
    cfg.DictOpt(
        "instance_type_map",
        default={},
        help="""
Flavor name to EC2 instance type.

A flavor missing here is launched as its extra spec ``ec2:instance_type``;
a flavor with neither cannot be launched (the build fails at once, and the
flavor reports no room). Every type named here is checked with
DescribeInstanceTypes at startup, which refuses to start on an unknown one.

Possible values:

* ``flavor:type`` pairs, e.g. ``m1.small:t3.small,m1.large:m5.large``

Related options:

* ``prices``, ``image_map``
"""),
    cfg.DictOpt(
        "image_map",
        default={},
        help="""
Image uuid or image name to AMI id.

An image missing here is launched as its image property ``ec2_ami``, or as
its id if that already is an AMI id (``ami-…``). Every AMI named here is
checked with DescribeImages at startup, which refuses to start on a
missing one.

Possible values:

* ``image:ami`` pairs, e.g. ``cirros:ami-0abc1234``

Related options:

* ``instance_type_map``
"""),
    cfg.DictOpt(
        "tags",
        default={},
        help="""
Extra tags put on every instance and volume at launch.

Tags whose key starts with ``cellagent:`` or ``aws:`` are refused. EC2
allows 50 tags per resource and the backend uses 3 plus one per instance
of a batched launch, so more extra tags make launch batches smaller.

Possible values:

* ``key:value`` pairs, e.g. ``team:cloud,cost-center:1234``

Related options:

* ``owner``
"""),
    cfg.BoolOpt(
        "hibernate",
        default=False,
        help="""
Pause and suspend by hibernating instead of a plain stop.

Instances are then launched with hibernation configured, which EC2 allows
only for some instance families and AMIs and needs an encrypted root
volume large enough for the RAM. When a hibernate is refused, the backend
stops the instance instead and logs a warning.

Possible values:

* True: pause and suspend hibernate the instance
* False: they stop it (the guest's RAM is lost)
"""),
    cfg.BoolOpt(
        "elastic_ip",
        default=False,
        help="""
Give every instance an Elastic IP address of its own.

Once an instance is running, the backend allocates an address
(AllocateAddress, tagged with ``cellagent:owner``, ``cellagent:cell`` and
the instance uuid, so that an allocation whose answer was lost is found
again), associates it, and reports it as the instance's floating address.
Deleting the instance disassociates and releases it; the reconciliation
releases our tagged addresses whose instance is gone. Costs two or three
EC2 calls per instance; nothing when off. EC2 allows 5 Elastic IPs per
region unless the quota is raised: an allocation EC2 refuses puts the
instance in ERROR with the refusal as its fault.

Possible values:

* False: the instance keeps the public address EC2 gives it, if any (it
  changes on stop and start)
* True: an Elastic IP per instance
"""),
    # -- budget and quota ---------------------------------------------------
    cfg.IntOpt(
        "max_instances",
        default=0,
        min=0,
        help="""
Most instances this cell may have in EC2 at once (a budget cap).

Every instance not terminated counts, stopped ones too. A launch beyond it
fails with InsufficientCapacity before RunInstances is called.

Possible values:

* 0: no cap
* a positive number of instances

Related options:

* ``max_vcpus``, ``max_cost_per_hour``
"""),
    cfg.IntOpt(
        "max_vcpus",
        default=0,
        min=0,
        help="""
Most vCPUs this cell may run in EC2 at once (a budget cap).

Counts pending, running, stopping and shutting-down instances, as the EC2
vCPU quota does. The lower of this and the vCPU quota bounds launches and
the reported capacity.

Possible values:

* 0: no cap beyond the quota
* a positive number of vCPUs

Related options:

* ``vcpu_quota``, ``max_instances``, ``max_cost_per_hour``
"""),
    cfg.FloatOpt(
        "max_cost_per_hour",
        default=0.0,
        min=0.0,
        help="""
Spend cap: most US dollars per hour of compute this cell may run.

The cost of a running instance is its type's entry in ``prices``. A launch
that would go over it fails with InsufficientCapacity ("spend cap") before
RunInstances is called, and the reported room shrinks with the spend. When
set, every type in ``instance_type_map`` must have a price.

Possible values:

* 0: no spend cap
* a positive amount in US dollars per hour

Related options:

* ``prices``, ``max_instances``, ``max_vcpus``
"""),
    cfg.DictOpt(
        "prices",
        default={},
        help="""
Instance type to its on-demand price, in US dollars per hour.

Used by the spend cap only; EC2's pricing API is not queried.

Possible values:

* ``type:price`` pairs, e.g. ``t3.small:0.0208,m5.large:0.096``

Related options:

* ``max_cost_per_hour``
"""),
    cfg.IntOpt(
        "vcpu_quota",
        default=64,
        min=0,
        help="""
EC2 vCPU quota used when Service Quotas cannot tell it.

The backend asks Service Quotas for "Running On-Demand Standard instances"
(quota code L-1216C47A) at startup and every hour; when that is not
available (no permission, an EC2-compatible endpoint, moto), this value is
the quota. Our own running vCPUs are subtracted from it.

Possible values:

* 0 or more vCPUs

Related options:

* ``max_vcpus``, ``endpoint_url``
"""),
    cfg.IntOpt(
        "lease_seconds",
        default=0,
        min=0,
        help="""
Length of the lease the agent keeps on its instances (0: no lease).

When set, the agent tags every instance it owns with ``cellagent:lease-until``
(a Unix time) and renews the tag every third of the lease, in one CreateTags
per 500 instances. ``cellagent-manage ec2 watchdog``, run from anywhere with
EC2 access (cron, another host), terminates instances whose lease ran out:
the instances of an agent that died and did not come back. An instance
without the tag is never touched.

Possible values:

* 0 (no lease) or the lease length in seconds, e.g. 3600
"""),
    cfg.IntOpt(
        "ice_ttl",
        default=300,
        min=0,
        help="""
Seconds an instance type stays unavailable after EC2 ran out of it.

After InsufficientInstanceCapacity (or InstanceLimitExceeded,
VcpuLimitExceeded) the type reports no room and its launches fail at once,
without calling EC2, for this long.

Possible values:

* 0: do not remember capacity errors
* a positive number of seconds
"""),
    # -- API pacing -------------------------------------------------------
    cfg.FloatOpt(
        "batch_idle",
        default=0.1,
        min=0.0,
        help="""
Seconds a launch batch waits for another identical launch.

Builds with the same AMI, instance type, subnet, security groups, key pair
and user data go out as one RunInstances with a count. A batch is sent
once no build joined it for this long, after ``batch_max`` in any case, or
when it is full. While a RunInstances of the same launch spec is still
waiting for EC2's answer, a quiet spell does not close the batch (the
builds of a storm keep arriving once that answer is in); ``batch_max``
still does.

Possible values:

* 0: send every launch at once (no batching)
* a positive number of seconds

Related options:

* ``batch_max``
"""),
    cfg.FloatOpt(
        "batch_max",
        default=1.0,
        min=0.0,
        help="""
Longest a launch batch is held open, in seconds.

Possible values:

* 0 or more seconds; at least ``batch_idle`` to be useful

Related options:

* ``batch_idle``
"""),
    cfg.IntOpt(
        "lost_instance_grace",
        default=60,
        min=0,
        help="""
Seconds an instance we just launched may be missing from DescribeInstances.

EC2 is eventually consistent: right after RunInstances an instance may be
unknown (InvalidInstanceID.NotFound) for a short while. Within this window
such an instance is reported PENDING; after it, DELETED.

Possible values:

* 0 or more seconds
"""),
    cfg.IntOpt(
        "capacity_refresh",
        default=20,
        min=0,
        help="""
Seconds a capacity report may rest on what the backend knows already.

The backend keeps the type and state of every instance of the cell from
its own launches, polls and terminations. A capacity report describes all
our instances (one paginated DescribeInstances) only when no such
describe was made for this long, so the reports sent on every change
during a storm cost no call, while changes made behind the agent's back
(another agent process of the cell, the console, EC2 itself) show in the
reported room within this time. Keep it below ``[cells] report_interval``
so that every periodic report is a fresh one.

Possible values:

* 0: every report describes our instances
* a positive number of seconds

Related options:

* ``[cells] report_interval``
"""),
    cfg.IntOpt(
        "max_attempts",
        default=5,
        min=1,
        help="""
Attempts per EC2 API call, in botocore's standard retry mode.

botocore retries throttling, 5xx and connection errors with jittered
exponential backoff; after the last attempt the operation fails with a
retryable error and the manager retries it later.

Possible values:

* 1 (no retry) or more

Related options:

* ``api_rate``
"""),
    cfg.FloatOpt(
        "api_rate",
        default=20.0,
        min=0.1,
        help="""
Highest rate of EC2 API requests, per account and region, per second.

One token bucket per account (or endpoint) and region is shared by every
EC2 backend of the process. It halves its rate when EC2 answers
RequestLimitExceeded and grows back by a twentieth of this per successful
request (AIMD).

Possible values:

* 0.1 or more requests per second

Related options:

* ``api_burst``, ``max_attempts``
"""),
    cfg.IntOpt(
        "api_burst",
        default=50,
        min=1,
        help="""
Requests the EC2 rate limiter lets through at once before pacing.

Possible values:

* 1 or more requests

Related options:

* ``api_rate``
"""),
]


def register_opts(conf):
    group.register(conf, ec2_group, ec2_opts)


def list_opts():
    return [(ec2_group, ec2_opts)]
