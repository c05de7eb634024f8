// Package testkit is Bulkhead's shared test fixture: an embedded JetStream
// with every stream and bucket, and builders for destinations, impressions
// and batches whose fields all have defaults, so a test states only what
// it is about.
package testkit

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/bulkhead-io/bulkhead/pkg/codec"
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/natstest"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// Env is a running JetStream with Bulkhead's streams and buckets.
type Env struct {
	Server       *server.Server
	NC           *nats.Conn
	JS           jetstream.JetStream
	Destinations jetstream.KeyValue
	Decisions    jetstream.KeyValue
	Leases       jetstream.KeyValue
}

// JetStream starts an embedded server and creates every stream and bucket
// with limits (the zero Limits: the defaults); all of it ends with the test.
func JetStream(t testing.TB, limits stream.Limits) *Env {
	t.Helper()
	s := natstest.RunJetStream(t)
	nc, js := natstest.Connect(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := stream.Ensure(ctx, js, limits); err != nil {
		t.Fatal(err)
	}
	e := &Env{Server: s, NC: nc, JS: js}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{topology.BucketDestinations, &e.Destinations}, {topology.BucketQuarantine, &e.Decisions}, {topology.BucketLeases, &e.Leases}} {
		kv, err := js.KeyValue(ctx, b.name)
		if err != nil {
			t.Fatal(err)
		}
		*b.kv = kv
	}
	return e
}

// Destination returns an enabled destination of tenant t1 at
// https://example.com/<id> with a fresh signing secret and a 2 s timeout,
// changed by each option.
func Destination(id string, options ...func(*adminv1.Destination)) *adminv1.Destination {
	secret, err := webhook.NewSecret()
	if err != nil {
		panic(err) // the system's random source failed
	}
	d := &adminv1.Destination{Id: id, TenantId: "t1", Url: "https://example.com/" + id, Secret: secret,
		Enabled: true, Timeout: durationpb.New(2 * time.Second)}
	for _, o := range options {
		o(d)
	}
	return d
}

// Tenant sets a destination's tenant.
func Tenant(tenant string) func(*adminv1.Destination) {
	return func(d *adminv1.Destination) { d.TenantId = tenant }
}

// URL sets a destination's URL.
func URL(url string) func(*adminv1.Destination) {
	return func(d *adminv1.Destination) { d.Url = url }
}

// Put stores d in the destinations bucket, as the admin API does.
func (e *Env) Put(t testing.TB, d *adminv1.Destination) {
	t.Helper()
	b, err := codec.Encode(d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Destinations.Put(context.Background(), d.GetId(), b); err != nil {
		t.Fatal(err)
	}
}

// Decide stores a decision for dest with revision rev.
func (e *Env) Decide(t testing.TB, dest string, s eventv1.State, rev uint64) {
	t.Helper()
	b, err := codec.Encode(&eventv1.Decision{DestinationId: dest, TenantId: "t1", State: s, Reason: "test", Revision: rev})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Decisions.Put(context.Background(), dest, b); err != nil {
		t.Fatal(err)
	}
}

// Impressions returns n valid impressions keyed <prefix>-0 … <prefix>-(n-1)
// of split "s", treatment "on", each then changed by every option (which
// also gets the impression's index).
func Impressions(prefix string, n int, options ...func(i int, imp *ingestv1.Impression)) []*ingestv1.Impression {
	out := make([]*ingestv1.Impression, n)
	for i := range out {
		out[i] = &ingestv1.Impression{Key: fmt.Sprintf("%s-%d", prefix, i), Split: "s", Treatment: "on", Time: 1700000000000}
		for _, o := range options {
			o(i, out[i])
		}
	}
	return out
}

// Full sets every field of an impression to a realistic value, for tests of
// what reaches a receiver and for payloads of a realistic size.
func Full(_ int, imp *ingestv1.Impression) {
	imp.EnvironmentId, imp.EnvironmentName, imp.BucketingKey, imp.Label = "env-1", "prod", imp.GetKey(), "default rule"
	imp.MachineName, imp.MachineIp, imp.SplitVersionNumber = "host-7", "10.0.0.7", 1699999999999
	imp.Sdk, imp.SdkVersion, imp.Properties = "go", "6.4.0", "{}"
}

// Batch returns a routed batch of tenant t1 for dest holding imps.
func Batch(id, dest string, imps []*ingestv1.Impression) *eventv1.Batch {
	return &eventv1.Batch{BatchId: id, TenantId: "t1", DestinationId: dest, Impressions: imps}
}
