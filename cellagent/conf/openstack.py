"""[openstack] options: the OpenStack backend (``[backend] driver = openstack``).

Which cloud and as whom (a ``clouds.yaml`` entry, or explicit keystoneauth
options), the compute microversion, how flavors, images and networks map to
the remote cloud, and what the operator allows us to use there. See
``docs/openstack.md`` for the design these options tune.
"""

from oslo_config import cfg

from cellagent.conf import group

openstack_group = cfg.OptGroup("openstack", title="OpenStack backend options", help="""
The OpenStack backend: bursting into another OpenStack cloud through its Nova
API. Credentials (a clouds.yaml cloud or keystoneauth options), the flavor,
image and network maps, and the operator's budget.
""")

openstack_opts = [
    # -- where, and as whom ------------------------------------------------
    cfg.StrOpt(
        "cloud",
        default=None,
        help="""
Name of a cloud in ``clouds.yaml``, read by openstacksdk's config loader.

When set, the auth and region options below are ignored: the cloud entry
carries them (as for the ``openstack`` command line client).

Possible values:

* unset: use ``auth_url`` and the options below it
* a cloud name from ``clouds.yaml`` (``OS_CLIENT_CONFIG_FILE`` or the usual
  places)
"""),
    cfg.URIOpt(
        "auth_url",
        default=None,
        schemes=["http", "https"],
        help="""
Keystone v3 endpoint, when ``cloud`` is not set.

Possible values:

* an http(s) URL such as ``https://keystone.example.org/v3``

Related options:

* ``username``, ``password``, ``project_name``
"""),
    cfg.StrOpt(
        "username",
        default=None,
        help="""
User name for password authentication, when ``cloud`` is not set.

Possible values:

* a Keystone user name
"""),
    cfg.StrOpt(
        "password",
        default=None,
        secret=True,
        help="""
Password of ``username``. Never logged; masked in the logged option values.

Possible values:

* the password of ``username``
"""),
    cfg.StrOpt(
        "project_name",
        default=None,
        help="""
Project whose quota the servers use, when ``cloud`` is not set.

Possible values:

* a Keystone project name
"""),
    cfg.StrOpt(
        "user_domain_name",
        default="Default",
        help="""
Domain of ``username``.

Possible values:

* a Keystone domain name
"""),
    cfg.StrOpt(
        "project_domain_name",
        default="Default",
        help="""
Domain of ``project_name``.

Possible values:

* a Keystone domain name
"""),
    cfg.StrOpt(
        "region_name",
        default=None,
        help="""
Region of the endpoints used, from the catalog.

Possible values:

* unset: the catalog's only region
* a region name such as ``RegionOne``
"""),
    cfg.StrOpt(
        "interface",
        default="public",
        choices=["public", "internal", "admin"],
        help="""
Catalog interface of the endpoints used.

Possible values:

* ``public``, ``internal`` or ``admin``
"""),
    cfg.StrOpt(
        "cacert",
        default=None,
        help="""
CA bundle to verify the cloud's TLS certificates.

Possible values:

* unset: the system's CA bundle
* the path of a PEM file
"""),
    cfg.StrOpt(
        "owner",
        default=None,
        sample_default="<[cells] name>",
        help="""
Value of the ``cellagent_owner`` server metadata of every server we create.

The backend sees (polls, lists, reconciles, deletes) only servers named
``name_prefix`` and carrying this owner, so it must be the same for every
agent process of one cell and differ between cells sharing a project.

Possible values:

* unset: the cell name (``[cells] name``)
* any string of at most 255 characters
"""),
    # -- the compute API ---------------------------------------------------
    cfg.StrOpt(
        "compute_api_version",
        default="2.96",
        help="""
Compute API microversion to use.

Possible values:

* a microversion such as ``2.96`` (at least 2.47, which embeds the flavor
  in a server); the start fails when the cloud does not offer it
* ``auto``: the newest both novaclient and the cloud speak
"""),
    # -- maps ---------------------------------------------------------------
    cfg.DictOpt(
        "flavor_map",
        default={},
        help="""
Local flavor name to remote flavor name or id.

A flavor missing here is looked up remotely by its own name. Every flavor
named here is checked at startup, which refuses to start on a missing one.

Possible values:

* ``local:remote`` pairs, e.g. ``m1.small:general.small``
"""),
    cfg.DictOpt(
        "image_map",
        default={},
        help="""
Image uuid or name (of the top cell) to remote image name or id.

An image missing here is looked up remotely by its name. Every image named
here is checked at startup, which refuses to start on a missing one.

Possible values:

* ``image:remote`` pairs, e.g. ``cirros:cirros-0.6.2``
"""),
    cfg.ListOpt(
        "networks",
        default=["auto"],
        help="""
Remote networks every server is attached to.

Names are resolved to ids at startup (refusing to start on an unknown one).

Possible values:

* ``auto``: Nova's auto-allocated network (or the project's only one)
* ``none``: no network
* a list of network names or ids
"""),
    cfg.StrOpt(
        "key_name",
        default=None,
        help="""
Remote key pair installed in every server.

Possible values:

* unset: no key pair
* the name of a key pair of the remote project
"""),
    cfg.StrOpt(
        "name_prefix",
        default="cellagent-",
        help="""
Prefix of the remote server names: ``<name_prefix><instance uuid>``.

Servers are found (before every create, in every poll) by this name.

Possible values:

* a string that no other server name of the project starts with
"""),
    # -- budget ---------------------------------------------------------------
    cfg.IntOpt(
        "max_instances",
        default=0,
        min=0,
        help="""
Most servers this cell may have remotely (a budget cap).

Possible values:

* 0: no cap beyond the remote quota
* a positive number of servers
"""),
    cfg.IntOpt(
        "max_vcpus",
        default=0,
        min=0,
        help="""
Most vCPUs this cell may use remotely (a budget cap).

Possible values:

* 0: no cap beyond the remote quota
* a positive number of vCPUs
"""),
    cfg.FloatOpt(
        "max_cost_per_hour",
        default=0.0,
        min=0.0,
        help="""
Spend cap in money per hour, from ``prices``.

When set, every remote flavor used needs a price.

Possible values:

* 0: no spend cap
* a positive amount per hour

Related options:

* ``prices``
"""),
    cfg.DictOpt(
        "prices",
        default={},
        help="""
Remote flavor name to its price per hour, for the spend cap.

Possible values:

* ``flavor:price`` pairs, e.g. ``general.small:0.02``
"""),
    # -- robustness ----------------------------------------------------------------
    cfg.IntOpt(
        "lost_create_grace",
        default=60,
        min=0,
        help="""
Seconds a create of unknown outcome blocks a new create of its instance.

A create whose answer was lost (timeout, connection closed, 5xx) may still
have made a server. Within it, a retried spawn that finds no server raises a retryable error
instead of creating one (the first create may still be in progress).

Possible values:

* 0 or more seconds
"""),
    cfg.IntOpt(
        "conflict_retries",
        default=3,
        min=0,
        help="""
Retries, with backoff, of an action refused with 409 in a task state.

Such a conflict is transient (for example ``powering-off``).

Possible values:

* 0 (no retry) or more
"""),
]


def register_opts(conf):
    group.register(conf, openstack_group, openstack_opts)


def list_opts():
    return [(openstack_group, openstack_opts)]
