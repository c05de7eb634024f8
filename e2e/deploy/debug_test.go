package deploy

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/stream"
)

func TestDebugEnsure(t *testing.T) {
	urls := startCluster(t, &violationLog{})
	nc := connect(t, urls, "ingest", nil)
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l := stream.DefaultLimits()
	l.Replicas = 3
	for _, c := range stream.Streams(l) {
		_, err := js.CreateOrUpdateStream(ctx, c)
		t.Log(c.Name, err)
	}
	for _, c := range stream.Buckets(l) {
		_, err := js.CreateOrUpdateKeyValue(ctx, c)
		t.Log(c.Bucket, err)
	}
}
