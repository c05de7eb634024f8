package admin_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/grpcserver"
	"github.com/bulkhead-io/bulkhead/pkg/grpctest"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/registry"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
	"github.com/bulkhead-io/bulkhead/services/monitor/internal/admin"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	opToken     = "op-token-123"
	viewerToken = "view-token-123"
)

type fixture struct {
	js     jetstream.JetStream
	dests  jetstream.KeyValue
	decs   jetstream.KeyValue
	client adminv1.AdminServiceClient
	op     context.Context // operator "ops"
	viewer context.Context // read-only "viewer"
	anon   context.Context // no token
}

// start serves AdminService over bufconn with the real interceptor chain,
// backed by a real JetStream.
func start(t *testing.T) *fixture {
	t.Helper()
	tk := testkit.JetStream(t, stream.Limits{})
	js := tk.JS
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	policy, err := netguard.NewPolicy([]string{"127.0.0.0/8"})
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := admin.ParseTokens([]string{"ops:" + opToken + ":operator", "viewer:" + viewerToken + ":read"})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := admin.New(ctx, js, policy, tokens, admin.Defaults{Destination: registry.DefaultDestination(), ReplayRate: 1000},
		nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	conn := grpctest.Start(t, grpcserver.Options{Auth: srv.Authenticate}, func(s *grpc.Server) {
		adminv1.RegisterAdminServiceServer(s, srv)
	})
	return &fixture{js: js, dests: tk.Destinations, decs: tk.Decisions, client: adminv1.NewAdminServiceClient(conn),
		op: grpctest.WithToken(ctx, opToken), viewer: grpctest.WithToken(ctx, viewerToken), anon: ctx}
}

func (f *fixture) create(t *testing.T, id, tenant string, enabled bool) *adminv1.Destination {
	t.Helper()
	resp, err := f.client.CreateDestination(f.op, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
		Id: id, TenantId: tenant, Url: "http://127.0.0.1:9/" + id, Enabled: enabled,
	}})
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	return resp.GetDestination()
}

// stored reads a destination straight from KV.
func (f *fixture) stored(t *testing.T, id string) *adminv1.Destination {
	t.Helper()
	e, err := f.dests.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("kv get %s: %v", id, err)
	}
	var d adminv1.Destination
	if err := registry.Decode(e.Value(), &d); err != nil {
		t.Fatal(err)
	}
	return &d
}

// decision reads a decision and its KV revision straight from KV (nil, 0: none).
func (f *fixture) decision(t *testing.T, id string) (*eventv1.Decision, uint64) {
	t.Helper()
	e, err := f.decs.Get(context.Background(), id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0
	}
	if err != nil {
		t.Fatal(err)
	}
	var d eventv1.Decision
	if err := registry.Decode(e.Value(), &d); err != nil {
		t.Fatal(err)
	}
	return &d, e.Revision()
}

// auditOn decodes every AUDIT record on subj, in order, with newMsg.
func auditOn[M proto.Message](t *testing.T, js jetstream.JetStream, subj string, newMsg func() M) []M {
	t.Helper()
	ctx := context.Background()
	s, err := js.Stream(ctx, topology.StreamAudit)
	if err != nil {
		t.Fatal(err)
	}
	var out []M
	for seq := uint64(1); ; {
		raw, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		m := newMsg()
		if err := registry.Decode(raw.Data, m); err != nil {
			t.Fatalf("audit record on %s: %v", subj, err)
		}
		out = append(out, m)
		seq = raw.Sequence + 1
	}
}

func (f *fixture) adminAudit(t *testing.T, tenant string) []*eventv1.AuditRecord {
	return auditOn(t, f.js, "imp.audit.admin."+tenant, func() *eventv1.AuditRecord { return &eventv1.AuditRecord{} })
}

func (f *fixture) decisionAudit(t *testing.T, dest string) []*eventv1.Decision {
	return auditOn(t, f.js, "imp.audit.quarantine."+dest, func() *eventv1.Decision { return &eventv1.Decision{} })
}

func actions(recs []*eventv1.AuditRecord) []string {
	var out []string
	for _, r := range recs {
		out = append(out, r.GetAction())
	}
	return out
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %v", what, err, code)
	}
}

func TestDestinationCRUD(t *testing.T) {
	f := start(t)
	created := f.create(t, "d1", "t1", true)

	// The secret is generated, valid, and returned by this call only.
	if !strings.HasPrefix(created.GetSecret(), "whsec_") {
		t.Fatalf("created secret = %q", created.GetSecret())
	}
	if _, err := webhook.ParseSecret(created.GetSecret()); err != nil {
		t.Errorf("generated secret does not parse: %v", err)
	}
	if created.GetMaxBatchImpressions() != 500 || created.GetLinger().AsDuration() != 200*time.Millisecond ||
		created.GetTimeout().AsDuration() != 10*time.Second || created.GetCreated() == nil {
		t.Errorf("defaults not filled: %v", created)
	}
	if got := f.stored(t, "d1"); !proto.Equal(got, created) {
		t.Errorf("stored %v, returned %v", got, created)
	}

	given, err := webhook.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := f.client.CreateDestination(f.op, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{
		Id: "d2", TenantId: "t1", Url: "https://127.0.0.1:8443/in", Secret: given, Enabled: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetDestination().GetSecret() != given {
		t.Errorf("given secret replaced")
	}
	f.create(t, "d3", "t2", true)

	t.Run("create refusals", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			d    *adminv1.Destination
			code codes.Code
		}{
			{"exists", &adminv1.Destination{Id: "d1", TenantId: "t1", Url: "http://127.0.0.1:9/x"}, codes.AlreadyExists},
			{"private address", &adminv1.Destination{Id: "p1", TenantId: "t1", Url: "http://10.1.2.3/hook"}, codes.InvalidArgument},
			{"metadata address", &adminv1.Destination{Id: "p2", TenantId: "t1", Url: "http://169.254.169.254/latest"}, codes.InvalidArgument},
			{"bad id", &adminv1.Destination{Id: "a.b", TenantId: "t1", Url: "http://127.0.0.1:9/x"}, codes.InvalidArgument},
			{"no url", &adminv1.Destination{Id: "p3", TenantId: "t1"}, codes.InvalidArgument},
			{"bad secret", &adminv1.Destination{Id: "p4", TenantId: "t1", Url: "http://127.0.0.1:9/x", Secret: "whsec_c2hvcnQ="}, codes.InvalidArgument},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, err := f.client.CreateDestination(f.op, &adminv1.CreateDestinationRequest{Destination: tc.d})
				wantCode(t, "CreateDestination", err, tc.code)
				if tc.code != codes.AlreadyExists {
					if _, err := f.dests.Get(context.Background(), tc.d.GetId()); !errors.Is(err, jetstream.ErrKeyNotFound) && tc.d.GetId() != "a.b" {
						t.Errorf("refused destination stored: %v", err)
					}
				}
			})
		}
	})

	t.Run("get and list redact", func(t *testing.T) {
		got, err := f.client.GetDestination(f.viewer, &adminv1.GetDestinationRequest{Id: "d1"})
		if err != nil {
			t.Fatal(err)
		}
		if got.GetDestination().GetSecret() != "" || got.GetDestination().GetUrl() != created.GetUrl() {
			t.Errorf("GetDestination = %v", got.GetDestination())
		}
		_, err = f.client.GetDestination(f.viewer, &adminv1.GetDestinationRequest{Id: "nope"})
		wantCode(t, "GetDestination(nope)", err, codes.NotFound)

		for _, tc := range []struct {
			tenant string
			want   []string
		}{{"", []string{"d1", "d2", "d3"}}, {"t1", []string{"d1", "d2"}}, {"t2", []string{"d3"}}, {"t9", nil}} {
			list, err := f.client.ListDestinations(f.viewer, &adminv1.ListDestinationsRequest{TenantId: tc.tenant})
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, d := range list.GetDestinations() {
				ids = append(ids, d.GetId())
				if d.GetSecret() != "" || d.GetPreviousSecret() != "" {
					t.Errorf("ListDestinations leaks %s's secret", d.GetId())
				}
			}
			if !slices.Equal(ids, tc.want) {
				t.Errorf("ListDestinations(%q) = %v, want %v", tc.tenant, ids, tc.want)
			}
		}
	})

	t.Run("update keeps the secret", func(t *testing.T) {
		in := proto.Clone(created).(*adminv1.Destination)
		in.Secret, in.Url, in.Gzip = "", "http://127.0.0.1:9/moved", true
		got, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: in})
		if err != nil {
			t.Fatal(err)
		}
		if got.GetDestination().GetSecret() != "" {
			t.Error("update without rotation returned the secret")
		}
		st := f.stored(t, "d1")
		if st.GetSecret() != created.GetSecret() || st.GetUrl() != in.GetUrl() || !st.GetGzip() ||
			!proto.Equal(st.GetCreated(), created.GetCreated()) || st.GetPreviousSecret() != "" {
			t.Errorf("stored after update = %v", st)
		}
	})

	t.Run("rotate", func(t *testing.T) {
		in := f.stored(t, "d1")
		in.Secret = ""
		got, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: in, RotateSecret: true})
		if err != nil {
			t.Fatal(err)
		}
		d := got.GetDestination()
		if !strings.HasPrefix(d.GetSecret(), "whsec_") || d.GetSecret() == created.GetSecret() {
			t.Errorf("rotated secret = %q (old %q)", d.GetSecret(), created.GetSecret())
		}
		st := f.stored(t, "d1")
		if st.GetSecret() != d.GetSecret() || st.GetPreviousSecret() != created.GetSecret() {
			t.Errorf("stored secrets = %q / previous %q", st.GetSecret(), st.GetPreviousSecret())
		}
		// The previous secret keeps signing for a day.
		if exp := time.Until(st.GetPreviousSecretExpires().AsTime()); exp < 23*time.Hour || exp > 25*time.Hour {
			t.Errorf("previous secret expires in %v, want ~24h", exp)
		}
	})

	t.Run("tenant is fixed", func(t *testing.T) {
		in := f.stored(t, "d1")
		in.Secret, in.TenantId = "", "t2"
		_, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: in})
		wantCode(t, "UpdateDestination to t2", err, codes.InvalidArgument)
		if got := f.stored(t, "d1").GetTenantId(); got != "t1" {
			t.Errorf("tenant changed to %s", got)
		}
		_, err = f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: &adminv1.Destination{Id: "nope", TenantId: "t1", Url: "http://127.0.0.1:9/"}})
		wantCode(t, "UpdateDestination(nope)", err, codes.NotFound)
	})

	t.Run("delete", func(t *testing.T) {
		if _, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d2", Reason: "before delete"}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.client.DeleteDestination(f.op, &adminv1.DeleteDestinationRequest{Id: "d2"}); err != nil {
			t.Fatal(err)
		}
		_, err := f.client.GetDestination(f.op, &adminv1.GetDestinationRequest{Id: "d2"})
		wantCode(t, "GetDestination after delete", err, codes.NotFound)
		if d, _ := f.decision(t, "d2"); d != nil {
			t.Errorf("decision kept after delete: %v", d)
		}
		_, err = f.client.DeleteDestination(f.op, &adminv1.DeleteDestinationRequest{Id: "d2"})
		wantCode(t, "second delete", err, codes.NotFound)
	})

	recs := f.adminAudit(t, "t1")
	for _, a := range []string{"CreateDestination", "UpdateDestination", "DeleteDestination"} {
		if !slices.Contains(actions(recs), a) {
			t.Errorf("no %s in the audit trail: %v", a, actions(recs))
		}
	}
	for _, r := range recs {
		if r.GetActor() != "ops" || r.GetAt() == nil {
			t.Errorf("audit record without actor or time: %v", r)
		}
		if b, _ := registry.Encode(r); strings.Contains(string(b), "whsec_") {
			t.Errorf("audit record carries a secret: %s", b)
		}
	}
}

func TestRoles(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)
	calls := []struct {
		name     string
		readOnly bool
		call     func(ctx context.Context) error
	}{
		{"GetDestination", true, func(ctx context.Context) error {
			_, err := f.client.GetDestination(ctx, &adminv1.GetDestinationRequest{Id: "d1"})
			return err
		}},
		{"ListDestinations", true, func(ctx context.Context) error {
			_, err := f.client.ListDestinations(ctx, &adminv1.ListDestinationsRequest{})
			return err
		}},
		{"GetDestinationHealth", true, func(ctx context.Context) error {
			_, err := f.client.GetDestinationHealth(ctx, &adminv1.GetDestinationHealthRequest{Id: "d1"})
			return err
		}},
		{"ExportParked", true, func(ctx context.Context) error {
			st, err := f.client.ExportParked(ctx, &adminv1.ExportParkedRequest{Id: "d1"})
			if err != nil {
				return err
			}
			for {
				if _, err := st.Recv(); errors.Is(err, io.EOF) {
					return nil
				} else if err != nil {
					return err
				}
			}
		}},
		{"CreateDestination", false, func(ctx context.Context) error {
			_, err := f.client.CreateDestination(ctx, &adminv1.CreateDestinationRequest{Destination: &adminv1.Destination{Id: "d9", TenantId: "t1", Url: "http://127.0.0.1:9/"}})
			return err
		}},
		{"PauseDestination", false, func(ctx context.Context) error {
			_, err := f.client.PauseDestination(ctx, &adminv1.PauseDestinationRequest{Id: "d1", Reason: "r"})
			return err
		}},
		{"PurgeParked", false, func(ctx context.Context) error {
			_, err := f.client.PurgeParked(ctx, &adminv1.PurgeParkedRequest{Id: "d1", Reason: "r"})
			return err
		}},
		{"DeleteDestination", false, func(ctx context.Context) error {
			_, err := f.client.DeleteDestination(ctx, &adminv1.DeleteDestinationRequest{Id: "d1"})
			return err
		}},
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			wantViewer := codes.PermissionDenied
			if c.readOnly {
				wantViewer = codes.OK
			}
			wantCode(t, "viewer", c.call(f.viewer), wantViewer)
			wantCode(t, "no token", c.call(f.anon), codes.Unauthenticated)
			wantCode(t, "wrong token", c.call(grpctest.WithToken(f.anon, "not-a-token")), codes.Unauthenticated)
		})
	}
	// Nothing the refused calls asked for happened.
	if d, _ := f.decision(t, "d1"); d != nil {
		t.Errorf("refused pause stored a decision: %v", d)
	}
	if _, err := f.dests.Get(context.Background(), "d9"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("refused create stored d9: %v", err)
	}
	if _, err := f.dests.Get(context.Background(), "d1"); err != nil {
		t.Errorf("refused delete removed d1: %v", err)
	}
	// The operator may do what the viewer may not.
	wantCode(t, "operator pause", calls[5].call(f.op), codes.OK)
}

func TestParseTokens(t *testing.T) {
	for _, tc := range []struct {
		name  string
		specs []string
		ok    bool
	}{
		{"good", []string{"a:abcdef:read", "b:ghijkl:operator"}, true},
		{"none", nil, false},
		{"short token", []string{"a:abc:read"}, false},
		{"bad role", []string{"a:abcdef:admin"}, false},
		{"missing part", []string{"a:abcdef"}, false},
		{"no name", []string{":abcdef:read"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			toks, err := admin.ParseTokens(tc.specs)
			if (err == nil) != tc.ok {
				t.Fatalf("ParseTokens = %v, %v", toks, err)
			}
			if err != nil && len(tc.specs) > 0 && strings.Contains(err.Error(), strings.Split(tc.specs[0], ":")[1]+":") {
				t.Errorf("error leaks the token: %v", err)
			}
		})
	}
}

func TestPauseResume(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)

	p, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d1", Reason: "maintenance"})
	if err != nil {
		t.Fatal(err)
	}
	dec := p.GetDecision()
	if dec.GetState() != eventv1.State_STATE_PAUSED || dec.GetRevision() != 1 || dec.GetDecidedBy() != "operator:ops" ||
		!strings.Contains(dec.GetReason(), "maintenance") || dec.GetTenantId() != "t1" || dec.GetSince() == nil {
		t.Errorf("pause decision = %v", dec)
	}
	kvDec, rev1 := f.decision(t, "d1")
	if !proto.Equal(kvDec, dec) {
		t.Errorf("KV holds %v, response says %v", kvDec, dec)
	}

	// Pausing a paused destination changes nothing.
	again, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d1", Reason: "again"})
	if err != nil {
		t.Fatal(err)
	}
	if again.GetDecision().GetRevision() != 1 {
		t.Errorf("second pause made revision %d", again.GetDecision().GetRevision())
	}
	if _, rev := f.decision(t, "d1"); rev != rev1 {
		t.Errorf("second pause rewrote KV: rev %d -> %d", rev1, rev)
	}

	r, err := f.client.ResumeDestination(f.op, &adminv1.ResumeDestinationRequest{Id: "d1", Reason: "done"})
	if err != nil {
		t.Fatal(err)
	}
	if r.GetDecision().GetState() != eventv1.State_STATE_RECOVERING || r.GetDecision().GetRevision() != 2 {
		t.Errorf("resume decision = %v", r.GetDecision())
	}
	if _, rev2 := f.decision(t, "d1"); rev2 <= rev1 {
		t.Errorf("KV revision %d after resume, was %d", rev2, rev1)
	}

	// An operator resume of a policy quarantine continues its revisions.
	b, _ := registry.Encode(&eventv1.Decision{DestinationId: "d1", TenantId: "t1", State: eventv1.State_STATE_QUARANTINED, Revision: 7, DecidedBy: "policy"})
	if _, err := f.decs.Put(context.Background(), "d1", b); err != nil {
		t.Fatal(err)
	}
	r, err = f.client.ResumeDestination(f.op, &adminv1.ResumeDestinationRequest{Id: "d1", Reason: "probe by hand"})
	if err != nil {
		t.Fatal(err)
	}
	if r.GetDecision().GetRevision() != 8 || r.GetDecision().GetState() != eventv1.State_STATE_RECOVERING {
		t.Errorf("resume after quarantine rev 7 = %v, want RECOVERING rev 8", r.GetDecision())
	}

	var states []string
	for _, d := range f.decisionAudit(t, "d1") {
		states = append(states, fmt.Sprintf("%s@%d", d.GetState(), d.GetRevision()))
	}
	want := []string{"STATE_PAUSED@1", "STATE_RECOVERING@2", "STATE_RECOVERING@8"}
	if !slices.Equal(states, want) {
		t.Errorf("imp.audit.quarantine.d1 = %v, want %v", states, want)
	}
	recs := f.adminAudit(t, "t1")
	if got := actions(recs); !slices.Equal(got, []string{"CreateDestination", "PauseDestination", "PauseDestination", "ResumeDestination", "ResumeDestination"}) {
		t.Errorf("imp.audit.admin.t1 = %v", got)
	}
	if r := recs[1]; r.GetActor() != "ops" || r.GetReason() != "maintenance" || !slices.Equal(r.GetDestinationIds(), []string{"d1"}) {
		t.Errorf("pause audit record = %v", r)
	}

	_, err = f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "nope", Reason: "x"})
	wantCode(t, "pause unknown", err, codes.NotFound)
	_, err = f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d1"})
	wantCode(t, "pause without reason", err, codes.InvalidArgument)
}

func TestPauseTenant(t *testing.T) {
	f := start(t)
	for _, id := range []string{"d1", "d2", "d3"} {
		f.create(t, id, "t1", true)
	}
	f.create(t, "d4", "t2", true)
	if _, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d3", Reason: "earlier"}); err != nil {
		t.Fatal(err)
	}

	dry, err := f.client.PauseTenant(f.op, &adminv1.PauseTenantRequest{TenantId: "t1", Reason: "incident", DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dry.GetDestinationIds(), []string{"d1", "d2"}) {
		t.Errorf("dry run lists %v, want [d1 d2]", dry.GetDestinationIds())
	}
	for _, id := range []string{"d1", "d2", "d4"} {
		if d, _ := f.decision(t, id); d != nil {
			t.Errorf("dry run decided %s: %v", id, d)
		}
	}
	recs := f.adminAudit(t, "t1")
	last := recs[len(recs)-1]
	if last.GetAction() != "PauseTenant" || !last.GetDryRun() || !slices.Equal(last.GetDestinationIds(), []string{"d1", "d2"}) {
		t.Errorf("dry run audit = %v", last)
	}

	real, err := f.client.PauseTenant(f.op, &adminv1.PauseTenantRequest{TenantId: "t1", Reason: "incident"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(real.GetDestinationIds(), []string{"d1", "d2"}) {
		t.Errorf("PauseTenant paused %v, want [d1 d2]", real.GetDestinationIds())
	}
	for _, id := range []string{"d1", "d2", "d3"} {
		if d, _ := f.decision(t, id); d.GetState() != eventv1.State_STATE_PAUSED {
			t.Errorf("%s = %v, want PAUSED", id, d)
		}
	}
	if d, _ := f.decision(t, "d4"); d != nil {
		t.Errorf("another tenant's destination decided: %v", d)
	}

	res, err := f.client.ResumeTenant(f.op, &adminv1.ResumeTenantRequest{TenantId: "t1", Reason: "over"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.GetDestinationIds(), []string{"d1", "d2", "d3"}) {
		t.Errorf("ResumeTenant resumed %v", res.GetDestinationIds())
	}
	for _, id := range []string{"d1", "d2", "d3"} {
		if d, _ := f.decision(t, id); d.GetState() != eventv1.State_STATE_RECOVERING {
			t.Errorf("%s = %v, want RECOVERING", id, d)
		}
	}

	_, err = f.client.PauseTenant(f.op, &adminv1.PauseTenantRequest{TenantId: "t9", Reason: "x"})
	wantCode(t, "PauseTenant of a tenant without destinations", err, codes.NotFound)
}

func parkSome(t *testing.T, js jetstream.JetStream, dest string, n int) []string {
	t.Helper()
	var ids []string
	for i := range n {
		id := fmt.Sprintf("%s-b%d", dest, i)
		b := &eventv1.Batch{BatchId: id, TenantId: "t1", DestinationId: dest, Impressions: []*ingestv1.Impression{
			{Key: "u1", Split: "s", Treatment: "on", Time: 1}, {Key: "u2", Split: "s", Treatment: "off", Time: 2},
		}}
		if err := parked.Park(context.Background(), js, b, parked.Reason{Class: parked.Quarantined}, 0, id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	return ids
}

func parkedCount(t *testing.T, js jetstream.JetStream, dest string) int64 {
	t.Helper()
	n, _, err := parked.Stats(context.Background(), js, dest)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestReplayParked(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)
	f.create(t, "off", "t1", false)
	parkSome(t, f.js, "d1", 3)
	parkSome(t, f.js, "off", 1)
	if _, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d1", Reason: "x"}); err != nil {
		t.Fatal(err)
	}

	_, err := f.client.ReplayParked(f.op, &adminv1.ReplayParkedRequest{Id: "d1"})
	wantCode(t, "replay of a paused destination", err, codes.FailedPrecondition)
	_, err = f.client.ReplayParked(f.op, &adminv1.ReplayParkedRequest{Id: "off"})
	wantCode(t, "replay of a disabled destination", err, codes.FailedPrecondition)
	if n := parkedCount(t, f.js, "d1"); n != 3 {
		t.Fatalf("refused replay moved batches: %d parked", n)
	}

	h, err := f.client.GetDestinationHealth(f.viewer, &adminv1.GetDestinationHealthRequest{Id: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if h.GetHealth().GetParked() != 3 || h.GetHealth().GetOldestParked() == nil || h.GetHealth().GetDecision().GetState() != eventv1.State_STATE_PAUSED {
		t.Errorf("health = %v", h.GetHealth())
	}

	if _, err := f.client.ResumeDestination(f.op, &adminv1.ResumeDestinationRequest{Id: "d1", Reason: "x"}); err != nil {
		t.Fatal(err)
	}
	resp, err := f.client.ReplayParked(f.op, &adminv1.ReplayParkedRequest{Id: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetBatches() != 3 || resp.GetImpressions() != 6 {
		t.Errorf("ReplayParked = %v, want 3 batches, 6 impressions", resp)
	}
	if n := parkedCount(t, f.js, "d1"); n != 0 {
		t.Errorf("%d still parked", n)
	}
	h, err = f.client.GetDestinationHealth(f.viewer, &adminv1.GetDestinationHealthRequest{Id: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if h.GetHealth().GetPendingDelivery() != 3 || h.GetHealth().GetParked() != 0 {
		t.Errorf("after replay health = %v, want 3 pending delivery", h.GetHealth())
	}
	recs := f.adminAudit(t, "t1")
	if last := recs[len(recs)-1]; last.GetAction() != "ReplayParked" || !strings.Contains(last.GetDetail(), "3 batches") {
		t.Errorf("replay audit = %v", last)
	}
}

func TestExportParked(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)
	want := parkSome(t, f.js, "d1", 3)
	parkSome(t, f.js, "d2", 1)

	export := func(ctx context.Context, req *adminv1.ExportParkedRequest) ([]*adminv1.ExportParkedResponse, error) {
		st, err := f.client.ExportParked(ctx, req)
		if err != nil {
			return nil, err
		}
		var out []*adminv1.ExportParkedResponse
		for {
			m, err := st.Recv()
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			if err != nil {
				return out, err
			}
			out = append(out, m)
		}
	}
	ids := func(rs []*adminv1.ExportParkedResponse) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.GetBatchId())
		}
		return out
	}

	all, err := export(f.viewer, &adminv1.ExportParkedRequest{Id: "d1"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids(all), want) {
		t.Fatalf("exported %v, want %v", ids(all), want)
	}
	for _, r := range all {
		if r.GetParkReason() != "quarantined" || r.GetParkedAt() == nil || len(r.GetImpressions()) != 2 || r.GetImpressions()[1].GetKey() != "u2" {
			t.Errorf("exported %v", r)
		}
	}

	tail, err := export(f.viewer, &adminv1.ExportParkedRequest{Id: "d1", Range: &adminv1.TimeRange{Start: all[1].GetParkedAt()}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids(tail), want[1:]) {
		t.Errorf("range export = %v, want %v", ids(tail), want[1:])
	}
	head, err := export(f.viewer, &adminv1.ExportParkedRequest{Id: "d1", Range: &adminv1.TimeRange{End: all[1].GetParkedAt()}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids(head), want[:1]) {
		t.Errorf("range export = %v, want %v", ids(head), want[:1])
	}

	// A deleted destination's parked data stays exportable.
	if _, err := f.client.DeleteDestination(f.op, &adminv1.DeleteDestinationRequest{Id: "d1"}); err != nil {
		t.Fatal(err)
	}
	after, err := export(f.viewer, &adminv1.ExportParkedRequest{Id: "d1"})
	if err != nil || len(after) != 3 {
		t.Errorf("export after delete = %d, %v; want 3", len(after), err)
	}
	_, err = export(f.viewer, &adminv1.ExportParkedRequest{Id: "d1.>"})
	wantCode(t, "export of an invalid id", err, codes.InvalidArgument)
}

func TestPurgeParked(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)
	parkSome(t, f.js, "d1", 4)
	parkSome(t, f.js, "d2", 1)

	dry, err := f.client.PurgeParked(f.op, &adminv1.PurgeParkedRequest{Id: "d1", Reason: "customer asked", DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if dry.GetBatches() != 4 || parkedCount(t, f.js, "d1") != 4 {
		t.Errorf("dry run = %d, %d left; want 4, 4", dry.GetBatches(), parkedCount(t, f.js, "d1"))
	}
	real, err := f.client.PurgeParked(f.op, &adminv1.PurgeParkedRequest{Id: "d1", Reason: "customer asked"})
	if err != nil {
		t.Fatal(err)
	}
	if real.GetBatches() != 4 || parkedCount(t, f.js, "d1") != 0 {
		t.Errorf("purge = %d, %d left; want 4, 0", real.GetBatches(), parkedCount(t, f.js, "d1"))
	}
	if parkedCount(t, f.js, "d2") != 1 {
		t.Error("purge of d1 touched d2")
	}
	recs := f.adminAudit(t, "t1")
	var purges []*eventv1.AuditRecord
	for _, r := range recs {
		if r.GetAction() == "PurgeParked" {
			purges = append(purges, r)
		}
	}
	if len(purges) != 2 || !purges[0].GetDryRun() || purges[1].GetDryRun() || purges[1].GetReason() != "customer asked" {
		t.Errorf("purge audit = %v", purges)
	}
}

func TestWatchDecisions(t *testing.T) {
	f := start(t)
	f.create(t, "d1", "t1", true)
	f.create(t, "x1", "t2", true)

	ctx, cancel := context.WithCancel(f.viewer)
	defer cancel()
	st, err := f.client.WatchDecisions(ctx, &adminv1.WatchDecisionsRequest{TenantId: "t1"})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu   sync.Mutex
		seen []*eventv1.Decision
		done = make(chan error, 1)
	)
	go func() {
		for {
			m, err := st.Recv()
			if err != nil {
				done <- err
				return
			}
			mu.Lock()
			seen = append(seen, m.GetDecision())
			mu.Unlock()
		}
	}()

	// The watch is set up asynchronously on the server; a decision made
	// before it started is not replayed. Keep deciding (for t2, which the
	// filter must drop, then for t1) until one reaches the watcher.
	paused := false
	poll.CheckFor(t, 15*time.Second, 100*time.Millisecond, func() error {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n > 0 {
			return nil
		}
		if _, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "x1", Reason: "other tenant"}); err != nil {
			return err
		}
		if _, err := f.client.ResumeDestination(f.op, &adminv1.ResumeDestinationRequest{Id: "x1", Reason: "other tenant"}); err != nil {
			return err
		}
		var err error
		if paused {
			_, err = f.client.ResumeDestination(f.op, &adminv1.ResumeDestinationRequest{Id: "d1", Reason: "watch"})
		} else {
			_, err = f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "d1", Reason: "watch"})
		}
		paused = !paused
		if err != nil {
			return err
		}
		return errors.New("no decision streamed yet")
	})
	mu.Lock()
	first := seen[0]
	mu.Unlock()
	if first.GetDestinationId() != "d1" || first.GetTenantId() != "t1" {
		t.Errorf("streamed %v, want a decision about d1", first)
	}
	if s := first.GetState(); s != eventv1.State_STATE_PAUSED && s != eventv1.State_STATE_RECOVERING {
		t.Errorf("streamed state %v", s)
	}
	mu.Lock()
	for _, d := range seen {
		if d.GetTenantId() != "t1" {
			t.Errorf("filter let through %v", d)
		}
	}
	mu.Unlock()
	cancel()
	if err := <-done; status.Code(err) != codes.Canceled {
		t.Errorf("stream ended with %v, want Canceled", err)
	}
}

// TestReenablingReplaysWhatWasParked: a destination disabled (by a 410 or an
// operator) parks its traffic; enabling it again must give that backlog a
// way out (F4): it goes RECOVERING, which the routers replay. A paused one
// keeps its pause.
func TestReenablingReplaysWhatWasParked(t *testing.T) {
	f := start(t)
	d := f.create(t, "off", "t1", false)
	if dec, _ := f.decision(t, "off"); dec != nil {
		t.Fatalf("decision before re-enabling: %v", dec)
	}
	d.Enabled = true
	if _, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: d}); err != nil {
		t.Fatal(err)
	}
	dec, _ := f.decision(t, "off")
	if dec.GetState() != eventv1.State_STATE_RECOVERING || dec.GetDecidedBy() != "operator:ops" {
		t.Fatalf("after re-enabling: %v, want RECOVERING by operator:ops", dec)
	}
	// Enabled already: another update decides nothing.
	if _, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: d}); err != nil {
		t.Fatal(err)
	}
	if again, _ := f.decision(t, "off"); again.GetRevision() != dec.GetRevision() {
		t.Fatalf("an update of an enabled destination decided %v", again)
	}

	p := f.create(t, "paused", "t1", false)
	if _, err := f.client.PauseDestination(f.op, &adminv1.PauseDestinationRequest{Id: "paused", Reason: "x"}); err != nil {
		t.Fatal(err)
	}
	p.Enabled = true
	if _, err := f.client.UpdateDestination(f.op, &adminv1.UpdateDestinationRequest{Destination: p}); err != nil {
		t.Fatal(err)
	}
	if dec, _ := f.decision(t, "paused"); dec.GetState() != eventv1.State_STATE_PAUSED {
		t.Fatalf("re-enabling lifted a pause: %v", dec)
	}
}
