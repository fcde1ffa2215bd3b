"""The spawn tables as Django sees them: unmanaged (the store's Alembic revisions create them)."""

from django.db import migrations, models

import celery_spawn.contrib.django.models
from celery_spawn.protocol import JOB_STATES, OPERATION_STATES


class Migration(migrations.Migration):

    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name='Job',
            fields=[
                ('id', models.CharField(max_length=64, primary_key=True, serialize=False)),
                ('parent_id', models.CharField(blank=True, max_length=64, null=True, verbose_name='parent job')),
                ('root_id', models.CharField(max_length=64, verbose_name='root job')),
                ('operation_id', models.CharField(blank=True, max_length=64, null=True, verbose_name='operation')),
                ('position', models.IntegerField(default=0)),
                ('depth', models.IntegerField(default=0)),
                ('task_name', models.CharField(max_length=255)),
                ('queue', models.CharField(blank=True, max_length=255, null=True)),
                ('priority', models.IntegerField(blank=True, null=True)),
                ('state', models.CharField(choices=[(state, state) for state in JOB_STATES], max_length=24)),
                ('pending_deps', models.IntegerField(default=0)),
                ('retries', models.IntegerField(default=0)),
                ('message', models.TextField(blank=True, null=True)),
                ('error', models.TextField(blank=True, null=True)),
                ('created_at', celery_spawn.contrib.django.models.UTCDateTimeField()),
                ('dispatched_at', celery_spawn.contrib.django.models.UTCDateTimeField(blank=True, null=True)),
                ('started_at', celery_spawn.contrib.django.models.UTCDateTimeField(blank=True, null=True)),
                ('finished_at', celery_spawn.contrib.django.models.UTCDateTimeField(blank=True, null=True)),
                ('not_before', celery_spawn.contrib.django.models.UTCDateTimeField(blank=True, null=True)),
                ('worker', models.CharField(blank=True, max_length=255, null=True)),
                ('redeliveries', models.IntegerField(default=0)),
            ],
            options={
                'verbose_name': 'spawn job',
                'db_table': 'spawn_jobs',
                'ordering': ['-created_at'],
                'abstract': False,
                'managed': False,
            },
        ),
        migrations.CreateModel(
            name='Operation',
            fields=[
                ('id', models.CharField(max_length=64, primary_key=True, serialize=False)),
                ('label', models.CharField(blank=True, help_text="the spawn config's operation_id", max_length=64,
                                           null=True)),
                ('parent_id', models.CharField(max_length=64, verbose_name='parent job')),
                ('root_id', models.CharField(max_length=64, verbose_name='root job')),
                ('parent_task', models.CharField(blank=True, max_length=255, null=True)),
                ('handler', models.CharField(blank=True, max_length=255, null=True)),
                ('queue', models.CharField(blank=True, max_length=255, null=True)),
                ('depth', models.IntegerField(default=0)),
                ('state', models.CharField(choices=[(state, state) for state in OPERATION_STATES], max_length=24)),
                ('total', models.IntegerField(default=0, help_text='children spawned')),
                ('published_through', models.IntegerField(blank=True, null=True)),
                ('config', models.TextField(blank=True, null=True)),
                ('error', models.TextField(blank=True, null=True)),
                ('on_complete', models.TextField(blank=True, null=True)),
                ('wait_for_descendants', models.BooleanField(default=False)),
                ('fail_fast', models.BooleanField(default=False)),
                ('completed', models.BooleanField(default=False)),
                ('callback_state', models.CharField(blank=True, max_length=16, null=True)),
                ('created_at', celery_spawn.contrib.django.models.UTCDateTimeField()),
                ('updated_at', celery_spawn.contrib.django.models.UTCDateTimeField()),
                ('finished_at', celery_spawn.contrib.django.models.UTCDateTimeField(blank=True, null=True)),
                ('children_timed', models.IntegerField(blank=True, null=True)),
                ('children_seconds', models.FloatField(blank=True, null=True)),
                ('children_max_seconds', models.FloatField(blank=True, null=True)),
                ('children_cancelled', models.IntegerField(blank=True, help_text='children cancelled', null=True)),
                ('children_failed', models.IntegerField(blank=True, help_text='children failed', null=True)),
                ('children_lost', models.IntegerField(blank=True, help_text='children lost', null=True)),
                ('children_revoked', models.IntegerField(blank=True, help_text='children revoked', null=True)),
                ('children_succeeded', models.IntegerField(blank=True, help_text='children succeeded', null=True)),
            ],
            options={
                'verbose_name': 'spawn operation',
                'db_table': 'spawn_operations',
                'ordering': ['-created_at'],
                'permissions': [('cancel_spawn', 'Can cancel spawn trees')],
                'abstract': False,
                'managed': False,
            },
        ),
    ]
