// Package topology is the one home of every name Bulkhead's parts meet on:
// streams, subjects, consumers, KV buckets and lease keys. It builds every
// subject and id-derived name, and is the only place that does, so that no
// unvalidated id ever reaches NATS. (Stream and bucket configurations live
// in package stream.)
//
//	stream / bucket    subjects                    written by         read by
//	IMPRESSIONS        imp.in.<tenant>             ingest             router (durable "router")
//	DELIVERY           imp.deliver.<dest>          router, replay     deliverer (durable "deliver-<dest>")
//	PARKED             imp.parked.<dest>           router, deliverer  replay, monitor (probe, admin export)
//	OUTCOMES           imp.outcome.<dest>          deliverer, monitor monitor (ordered, every replica)
//	AUDIT              imp.audit.quarantine.<dest> monitor            operators, auditors
//	                   imp.audit.admin.<tenant>
//	KV destinations    <dest>                      admin, deliverer   every service (registry view)
//	KV quarantine      <dest>                      monitor, admin     router, deliverer, monitor
//	KV leases          monitor, replay-<dest>      monitor, router    the same (leadership)
package topology

import (
	"errors"
	"fmt"
	"regexp"
)

// ErrInvalidID is returned for a tenant or destination id that is not a
// subject token of the form [A-Za-z0-9_-]{1,64}.
var ErrInvalidID = errors.New("invalid id: want 1-64 characters of A-Z a-z 0-9 _ -")

// Stream and bucket names.
const (
	StreamImpressions = "IMPRESSIONS"
	StreamDelivery    = "DELIVERY"
	StreamParked      = "PARKED"
	StreamOutcomes    = "OUTCOMES"
	StreamAudit       = "AUDIT"

	BucketDestinations = "destinations"
	BucketQuarantine   = "quarantine"
	BucketLeases       = "leases"
	// BucketAdmission holds, under a tenant's id, why ingest refuses the
	// tenant (an eventv1.Refusal); the monitor writes it.
	BucketAdmission = "admission"

	// LeaseMonitor is the key in BucketLeases whose holder makes the
	// monitor's decisions.
	LeaseMonitor = "monitor"

	// HeaderTargets on a batch in IMPRESSIONS lists, comma-separated, the
	// only destinations it is still to be routed to: the router hands back
	// just the outputs it could not store, not the whole batch.
	HeaderTargets = "Bulkhead-Targets"

	// ConsumerRouter is the durable consumer of IMPRESSIONS that every
	// router replica shares.
	ConsumerRouter = "router"
)

// Wildcards that streams and consumers bind to.
const (
	AllIn       = "imp.in.>"
	AllDeliver  = "imp.deliver.>"
	AllParked   = "imp.parked.>"
	AllOutcomes = "imp.outcome.>"
	AllAudit    = "imp.audit.>"
)

var idPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidID reports whether id may be used as a tenant or destination id.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// CheckID returns an error wrapping ErrInvalidID when id is not valid.
func CheckID(id string) error {
	if !ValidID(id) {
		return fmt.Errorf("%q: %w", id, ErrInvalidID)
	}
	return nil
}

func build(prefix, id string) (string, error) {
	if err := CheckID(id); err != nil {
		return "", err
	}
	return prefix + id, nil
}

// In is the subject of a tenant's accepted impressions: imp.in.<tenant>.
func In(tenant string) (string, error) { return build("imp.in.", tenant) }

// Deliver is the subject of a destination's routed batches: imp.deliver.<dest>.
func Deliver(dest string) (string, error) { return build("imp.deliver.", dest) }

// Parked is the subject of a destination's parked batches: imp.parked.<dest>.
func Parked(dest string) (string, error) { return build("imp.parked.", dest) }

// Outcome is the subject of a destination's delivery outcomes: imp.outcome.<dest>.
func Outcome(dest string) (string, error) { return build("imp.outcome.", dest) }

// AuditQuarantine is the subject of a destination's decisions:
// imp.audit.quarantine.<dest>.
func AuditQuarantine(dest string) (string, error) { return build("imp.audit.quarantine.", dest) }

// AuditAdmin is the subject of admin actions on a tenant: imp.audit.admin.<tenant>.
func AuditAdmin(tenant string) (string, error) { return build("imp.audit.admin.", tenant) }

// IDFrom returns the last token of a subject built here (the tenant or
// destination id), or ErrInvalidID when it is not one.
func IDFrom(subj string) (string, error) {
	for i := len(subj) - 1; i >= 0; i-- {
		if subj[i] == '.' {
			return subj[i+1:], CheckID(subj[i+1:])
		}
	}
	return "", fmt.Errorf("subject %q: %w", subj, ErrInvalidID)
}

// LeaseReplay is the key in BucketLeases whose holder replays dest's parked
// backlog.
func LeaseReplay(dest string) (string, error) { return build("replay-", dest) }

// DeliverConsumer is the durable consumer of a destination's batches on
// DELIVERY, shared by every deliverer replica: deliver-<dest>.
func DeliverConsumer(dest string) (string, error) { return build("deliver-", dest) }
